"""train_hivg.py on bad input: one error line naming the file or flag, exit status 2; a diverging run stops
and keeps its last good checkpoint."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train_hivg
from models.weights import read_weights
from tests.conftest import BAD_CHECKPOINTS, flags, write_bad_checkpoint
from tests.test_train import REPO, run_script
from utils.checkpoint import leftover_temporaries, save_checkpoint
from utils.errors import UserError, reports_errors


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    from utils.losses import GroundingCriterion
    real, calls = GroundingCriterion.forward, []

    def poisoned(self, outputs, targets):  # finite through epoch 0 (6 steps of 8), NaN from the 2nd step of epoch 1
        calls.append(1)
        losses = real(self, outputs, targets)
        return {k: v * float("nan") for k, v in losses.items()} if len(calls) > 7 else losses

    monkeypatch.setattr(GroundingCriterion, "forward", poisoned)
    assert train_hivg.main(flags(data, tmp_path, "--epochs", "3")) == 1
    ckpt = read_weights(tmp_path / "checkpoint.pth").checkpoint
    assert ckpt["epoch"] == 0 and ckpt["resume_at"] == (1, 0)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    log = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0]


def test_errors_are_clear(data, stage0, tmp_path, capsys):
    for extra, message in ((["--epochs", "0"], "--epochs must be at least 1"),
                           (["--epoch_samples", "-5"], "--epoch_samples must be 0"),
                           (["--amp", "fp8"], "invalid choice"),
                           (["--hi_lora_retrain", str(tmp_path / "nope.pth")], "does not exist")):
        proc = run_script(["train_hivg.py", *flags(data, tmp_path, *extra)])
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    empty = tmp_path / "empty"
    (empty / "synthref").mkdir(parents=True)
    for split in ("train", "val"):
        torch.save([], empty / "synthref" / f"synthref_{split}.pth")
    assert train_hivg.main(flags(data, tmp_path / "o", "--split_root", str(empty), "--epochs", "1")) == 2
    assert "no usable samples" in capsys.readouterr().err
    bad = read_weights(stage0 / "checkpoint.pth").checkpoint
    bad["config"]["image_size"] = 32          # the network comes from the config, not from the stored flags
    save_checkpoint(tmp_path / "bad.pth", bad)
    assert train_hivg.main(["--hi_lora_retrain", str(tmp_path / "bad.pth"), "--output_dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"--hi_lora_retrain {tmp_path / 'bad.pth'} does not match the model of this run" in err
    assert err.count("\n") == 1, err


def one_error_line(err: str, prefix: str) -> bool:
    return err.startswith(f"train_hivg.py: error: {prefix}") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--resume", "--hi_lora_retrain"])
@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_files_one_line_naming_the_flag(stage0, tmp_path, capsys, flag, kind):
    path = write_bad_checkpoint(kind, tmp_path, stage0 / "checkpoint.pth")
    assert train_hivg.main([flag, str(path), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert one_error_line(err, f"{flag} {path} {BAD_CHECKPOINTS[kind]}"), err
    assert "weights_only" not in err and not (tmp_path / "ran").exists()


@pytest.mark.parametrize("change, expect", [
    ("model", "does not match the model its own config describes (the file was edited or mixed up with another "
              "model's): shape mismatch"),
    ("optimizer", ": its optimizer / scheduler / RNG state does not match the model of this run"),
    ("model only", "holds a model but no training state (optimizer, scheduler, rng, resume_at, best_acc missing)"),
])
def test_resume_of_another_models_checkpoint_is_refused(data, stage0, tmp_path, capsys, change, expect):
    """--resume continues a run with the network its checkpoint describes; weights or training state written for
    another model (files mixed up or edited) are refused in one line, not with PyTorch's key dump."""
    ckpt = read_weights(stage0 / "checkpoint.pth").checkpoint
    if change == "model":      # the weights of a model with a 4x wider fusion feed-forward
        ckpt["model"] = {k: v.repeat(4, *[1] * (v.dim() - 1)) if "linear1" in k else v
                         for k, v in ckpt["model"].items()}
    elif change == "optimizer":
        ckpt["optimizer"] = {"state": {}, "param_groups": []}
    else:
        ckpt = {k: ckpt[k] for k in ("model", "config", "args")}
    save_checkpoint(tmp_path / "c.pth", ckpt)
    assert train_hivg.main(["--resume", str(tmp_path / "c.pth"), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert one_error_line(err, f"--resume {tmp_path / 'c.pth'}") and expect in err, err


@pytest.mark.parametrize("damage", ["truncated", "zero-byte"])
def test_damaged_image_in_the_dataset_names_the_image_and_the_split_file(data, tmp_path, damage):
    """Through DataLoader workers (they hand the error back with their traceback as its text): still one line."""
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    first = torch.load(copy / "synthref" / "synthref_train.pth", weights_only=True)[0][0]
    image = copy / "synthref" / "images" / first
    image.write_bytes(image.read_bytes()[:len(image.read_bytes()) // 3] if damage == "truncated" else b"")
    proc = run_script(["train_hivg.py", *flags(data, tmp_path / "o", "--data_root", str(copy), "--split_root",
                                               str(copy), "--epochs", "1", "--num_workers", "2")], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert one_error_line(proc.stderr, f"image {image} (synthref train sample "), proc.stderr
    assert f"split file {copy / 'synthref' / 'synthref_train.pth'}" in proc.stderr and "datasets.verify" in proc.stderr


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(stage0, data, tmp_path, capsys):
    """--lr 1e30: the first steps overflow; the run stops on the non-finite loss (not inside the box loss),
    keeps the inherited model's best_checkpoint.pth and says so in one line."""
    out = tmp_path / "s1"
    assert train_hivg.main(["--hi_lora_retrain", str(stage0 / "best_checkpoint.pth"), "--lr", "1e30", "--epochs", "2",
                            "--epoch_samples", "16", "--print_freq", "1", "--output_dir", str(out)]) == 1
    printed = capsys.readouterr()
    errors = [line for line in (printed.out + printed.err).splitlines() if "error" in line]
    assert len(errors) == 1 and "non-finite loss" in errors[0], errors
    assert f"the last good checkpoints are kept ({out / 'best_checkpoint.pth'})" in errors[0]
    best = read_weights(out / "best_checkpoint.pth").checkpoint
    assert best["epoch"] == -1 and not (out / "checkpoint.pth").exists()
    assert all(torch.isfinite(v).all() for v in best["model"].values() if v.is_floating_point())
    assert train_hivg.main(flags(data, tmp_path / "fresh", "--lr", "1e30", "--epochs", "1", "--epoch_samples", "16",
                                 "--print_freq", "1")) == 1
    assert "no checkpoint was written yet" in capsys.readouterr().out and not list((tmp_path / "fresh").glob("*.pth"))


@pytest.mark.parametrize("flag, value, expect", [
    ("--imsize", "0", "--imsize must be a positive multiple of the model's patch size"),
    ("--max_query_len", "0", "--max_query_len must be at least 2 (start and end of text)"),
    ("--lr_drop", "0", "--lr_drop must be at least 1"),
    ("--run_epochs", "-2", "--run_epochs must be 0 (every epoch of --epochs) or more, got -2"),
    ("--print_freq", "-1", "--print_freq must be 0 (no progress lines) or more"),
    ("--clip_max_norm", "nan", "--clip_max_norm must be 0 (no clipping) or a finite positive number, got nan"),
    ("--clip_max_norm", "inf", "--clip_max_norm must be 0 (no clipping) or a finite positive number, got inf"),
    ("--clip_max_norm", "-1", "--clip_max_norm must be 0 (no clipping) or a finite positive number"),
    ("--lr", "-0.001", "--lr must be a finite number, 0 or more"),
    ("--lr", "nan", "--lr must be a finite number, 0 or more"),
    ("--weight_decay", "-0.1", "--weight_decay must be a finite number, 0 or more"),
    ("--epoch_samples", "-5", "--epoch_samples must be 0 (the whole split) or more"),
    ("--num_workers", "-1", "--num_workers must be 0 (load in the main process) or more"),
    ("--eval_batch_size", "-1", "--eval_batch_size must be 0 (--batch_size) or more"),
    ("--seed", "-1", "--seed must be from 0 to 2**32 - 1"),
    ("--vl_dropout", "1.5", "--vl_dropout must be at least 0 and below 1"),
    ("--vl_nheads", "0", "--vl_nheads must be at least 1"),
    ("--output_dir", "", "--output_dir is empty"),
])
def test_out_of_range_flags_one_line_naming_the_valid_values(data, tmp_path, capsys, monkeypatch, flag, value, expect):
    """Refused before anything runs: no traceback, no training that ignores the flag, nothing written (an empty
    --output_dir would write into the current folder)."""
    monkeypatch.chdir(tmp_path)
    argv = flags(data, tmp_path / "out", "--epochs", "1", "--lr_scheduler", "step", flag, value)
    assert train_hivg.main(argv) == 2
    err = capsys.readouterr().err
    assert one_error_line(err, expect), err
    assert not list(tmp_path.rglob("*.pth"))


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoints(data, tmp_path):
    """`ulimit -f` below a checkpoint's size: the write fails as on a full disk (Python ignores SIGXFSZ, so
    the write gets EFBIG), and torch.save reports it as "unexpected pos", naming no file."""
    run = tmp_path / "run"
    assert train_hivg.main(flags(data, run, "--epochs", "2", "--run_epochs", "1", "--epoch_samples", "8")) == 0
    kept = {name: (run / name).read_bytes() for name in ("checkpoint.pth", "best_checkpoint.pth")}
    limit_kb = len(kept["checkpoint.pth"]) // 2048
    proc = subprocess.run(["bash", "-c", f'ulimit -f {limit_kb} && exec "$0" train_hivg.py --resume "$1"',
                           sys.executable, str(run / "checkpoint.pth")], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert one_error_line(proc.stderr, f"no space left writing {run}/"), proc.stderr
    assert "checkpoint.pth (File too large); the previous " in proc.stderr and "checkpoint.pth is kept" in proc.stderr
    assert {name: (run / name).read_bytes() for name in kept} == kept
    assert not [t for name in kept for t in leftover_temporaries(run / name)]


def test_under_torchrun_an_error_all_ranks_raise_is_reported_by_rank_0_alone(monkeypatch, capsys):
    @reports_errors("tool")
    def fails(error):
        raise error

    monkeypatch.setenv("RANK", "1")
    assert fails(UserError("the same on every rank", every_rank=True)) == 2
    assert fails(ValueError("this rank's own")) == 2
    assert capsys.readouterr().err == "tool: error: rank 1: this rank's own\n"
    monkeypatch.setenv("RANK", "0")
    assert fails(UserError("the same on every rank", every_rank=True)) == 2
    assert capsys.readouterr().err == "tool: error: the same on every rank\n"
