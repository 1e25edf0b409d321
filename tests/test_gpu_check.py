"""benchmarks/gpu_check.sh --dry-run: every step of the GPU check, on the CPU with the tiny model, in one table."""
import math
import os
import re
import subprocess
import sys

from tests.conftest import REPO

BENCH = [f"bench tiny {run}, {variant}" for run in ("eval stage 0", "train stage 0", "train stage 3")
         for variant in ("fp32+TF32, fast", "fp32+TF32, reference", "bf16, fast")]
COMPILED = [f"bench tiny {run}, bf16+compile, fast" for run in ("eval stage 0", "train stage 0", "train stage 3")]
STEPS = ["CUDA tests (pytest -m cuda)", "run: synthetic data", "run: stage 0, epoch 1 of 2",
         "run: stage 0, --resume, epoch 2", "run: stage 1, --hi_lora_retrain, bf16", "run: eval.py, val and test",
         *BENCH, *COMPILED]


def test_dry_run_reports_every_step(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = (tmp_path / "gpu_check.md").read_text()
    assert table in proc.stdout and table.startswith("# GPU check: CPU, dry run")
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[1:]]   # after the header
    assert [r[0] for r in rows] == STEPS
    assert all(r[1] == "ok" for r in rows), table
    cells = dict((r[0], r) for r in rows)
    assert re.search(r"^\d+ skipped", cells["CUDA tests (pytest -m cuda)"][7])   # no CUDA here: all skipped
    assert "val Acc@0.5: " in cells["run: eval.py, val and test"][7] and "test Acc@0.5: " in cells[STEPS[5]][7]
    for name in BENCH + COMPILED:   # samples/s, memory, TFLOP/s and share of the bf16 peak all filled in
        figures = [float(c) for c in cells[name][3:7]]
        assert figures[0] > 0 and figures[1] > 0 and not any(map(math.isnan, figures)), name
