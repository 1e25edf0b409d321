"""Layers import downward only (scripts > utils/ > models/ > datasets/), and no module imports itself back.

Every import statement counts, those inside functions included: a lazy import still ties the layers together.
"""
import ast
from pathlib import Path

import pytest

from tests.conftest import REPO, is_project_source

PACKAGES = ("datasets", "models", "utils")
# layer -> the layers it must not import; a top-level module or benchmarks/ is a script
FORBIDDEN = {"datasets": {"models", "utils", "scripts"}, "models": {"utils", "scripts"}, "utils": {"scripts"}}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = REPO) -> dict:
    """{module name: path} of every project source file."""
    return {module_name(p, root): p for p in sorted(root.glob("**/*.py")) if is_project_source(p, root)}


def imported(name: str, path: Path, modules) -> set:
    """The project modules `name` (at `path`) imports: a `from x import y` names x.y when that is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return found & set(modules)


def layer(name: str) -> str:
    top = name.split(".")[0]
    return top if top in PACKAGES else "scripts"


def import_graph(root: Path = REPO) -> dict:
    modules = project_modules(root)
    return {name: imported(name, path, modules) - {name} for name, path in modules.items()}


def cycle(graph: dict) -> list:
    """One import cycle of `graph` as [a, b, ..., a], or [] when there is none."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return []

    for start in sorted(graph):
        found = [] if start in state else visit(start)
        if found:
            return found
    return []


def test_graph_sees_relative_and_lazy_imports():
    graph = import_graph()
    assert {"datasets.refer", "datasets.errors"} <= graph["datasets.verify"]     # from .refer / from .errors
    assert "datasets.synthetic" in graph["app"]                                   # inside a function
    assert "datasets.errors" in graph["utils.errors"]
    assert layer("benchmarks.bench_data") == layer("train_hivg") == "scripts"


@pytest.mark.parametrize("lower", sorted(FORBIDDEN))
def test_layers_import_downward_only(lower):
    graph = import_graph()
    upward = sorted(f"{name} imports {target}" for name, targets in graph.items() if layer(name) == lower
                    for target in targets if layer(target) in FORBIDDEN[lower])
    assert upward == []


def test_no_import_cycle():
    assert cycle(import_graph()) == []


def test_cycle_finder_reports_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) == []


def test_upward_import_is_seen(tmp_path):
    (tmp_path / "datasets").mkdir()
    (tmp_path / "utils").mkdir()
    (tmp_path / "datasets" / "__init__.py").write_text("")
    (tmp_path / "datasets" / "low.py").write_text("def f():\n    from utils.high import g\n")
    (tmp_path / "utils" / "__init__.py").write_text("")
    (tmp_path / "utils" / "high.py").write_text("from datasets import low\n")
    graph = import_graph(tmp_path)
    assert graph["datasets.low"] == {"utils.high"} and graph["utils.high"] == {"datasets.low"}
    assert cycle(graph) == ["datasets.low", "utils.high", "datasets.low"]
