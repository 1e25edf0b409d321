"""The README's "Reproduce the paper" eval commands, run as written (one process instead of seven) on the
authors' fixture checkpoint, converted on load, with data in the authors' layout."""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys

import torch

from tests.conftest import FIXTURES, REPO
from tests.data_helpers import write_layout

FIXTURE = FIXTURES / "hivg_tiny_unc_stage1"


def readme_eval_commands():
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Reproduce the paper.*?```bash\n(.*?)```", text, re.S).group(1)
    return block.replace("\\\n", " ")


def test_readme_eval_commands_run_on_an_authors_checkpoint(tmp_path):
    data = tmp_path / "data"
    for dataset, splits in (("unc", ("val", "testA", "testB")), ("referit", ("val", "test"))):
        write_layout(data, dataset, splits=splits, n=2)
    config = json.loads((FIXTURE / "config.json").read_text())
    state = torch.load(FIXTURE / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    for ds in ("unc", "referit"):  # the authors' layout: one folder per dataset
        (tmp_path / "ckpt" / "finetuning_base" / ds).mkdir(parents=True)
        torch.save({"model": state, "args": argparse.Namespace(**config["hivg_args"])},
                   tmp_path / "ckpt" / "finetuning_base" / ds / "best_checkpoint.pth")
    block = readme_eval_commands()
    line = next(l for l in block.splitlines() if "finetuning_base/$ds" in l)
    command = line.strip().replace("torchrun --nproc_per_node 7", "").replace("$ds", "DS")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for ds in ("unc", "referit"):
        args = shlex.split(command.replace("$D", f"--data_root {data} --split_root {data}")
                           .replace("$CKPT", str(tmp_path / "ckpt")).replace("DS", ds))
        args[args.index("--output_dir") + 1] = str(tmp_path / "out")
        proc = subprocess.run([sys.executable, *args, "--hf_clip_config", str(FIXTURE / "config.json"),
                               "--num_workers", "0"], cwd=REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "official-hivg checkpoint" in proc.stdout and "bridge attention: official" in proc.stdout
        assert "warning" not in proc.stderr                                # the authors' batch 60
    results = json.loads((tmp_path / "out" / "eval_best_checkpoint.json").read_text())
    assert set(results["unc"]) == {"val", "testA", "testB"} and set(results["referit"]) == {"val", "test"}
    table = subprocess.run([sys.executable, "-m", "utils.paper_table", "--row", "HiVG-B",
                            str(tmp_path / "out" / "eval_best_checkpoint.json")], cwd=REPO, capture_output=True,
                           text=True)
    assert table.returncode == 0 and table.stdout.count("\n") == 5, table.stderr
