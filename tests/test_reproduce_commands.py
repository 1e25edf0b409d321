"""The README's "Reproduce the paper" eval commands, run as written (one process instead of seven) on the
authors' fixture checkpoint, converted on load, with data in the authors' layout."""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from eval import warn_about_batching
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
        assert proc.stderr.count("warning") == 1                 # the authors' batch 60, but 7 processes
        assert "at --batch_size 60 per GPU on 7 GPUs" in proc.stderr and "this run at 60 on 1 process;" in proc.stderr
    results = json.loads((tmp_path / "out" / "eval_best_checkpoint.json").read_text())
    assert set(results["unc"]) == {"val", "testA", "testB"} and set(results["referit"]) == {"val", "test"}
    table = subprocess.run([sys.executable, "-m", "utils.paper_table", "--row", "HiVG-B",
                            str(tmp_path / "out" / "eval_best_checkpoint.json")], cwd=REPO, capture_output=True,
                           text=True)
    # the paper's table (5 lines), then the results outside its columns (ReferIt val) in a table of their own
    assert table.returncode == 0 and table.stdout.count("\n") == 9, table.stderr
    assert table.stdout.splitlines()[-1].startswith("| referit | val |"), table.stdout


# The authors' evaluation batching of each kind of model: (model, mixup, batch per GPU, processes).
AUTHORS_BATCHING = [("ViT-B/16", False, 60, 7), ("ViT-L/14", False, 32, 7), ("ViT-B/16", True, 64, 1),
                    ("ViT-L/14", True, 64, 7)]


@pytest.mark.parametrize("name,mixup,batch,processes", AUTHORS_BATCHING)
def test_official_bridge_warns_at_another_batch_or_process_count(capsys, name, mixup, batch, processes):
    config = argparse.Namespace(name=name, mixup=mixup, bridge_attention="official")
    warn_about_batching(config, batch, processes)
    assert capsys.readouterr().err == ""
    for batch_size, world_size in ((batch, 8), (batch + 1, processes)):
        warn_about_batching(config, batch_size, world_size)
        err = capsys.readouterr().err
        assert f"at --batch_size {batch} per GPU on {processes} GPU" in err
        assert f"this run at {batch_size} on {world_size} process" in err and err.count("\n") == 1
    warn_about_batching(argparse.Namespace(name=name, mixup=mixup, bridge_attention="per_sample"), batch + 1, 8)
    assert capsys.readouterr().err == ""
