"""train_hivg.py's --output_dir: checked before training, one run at a time, an earlier run kept unless the
new one continues it (--resume) or replaces it (--overwrite), and replaced only once the new run has
checked all its inputs."""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import train_hivg
from models.checkpoint_format import model_file
from models.flags import add_model_args
from models.hivg import build_model
from tests.conftest import flags
from tests.test_train import KILLED_SAVING_EPOCH, REPO, log_epochs, run_script
from utils.checkpoint import save_checkpoint
from utils.output_dir import claim

SHORT = ["--epochs", "1", "--epoch_samples", "8", "--vl_dim_feedforward", "64"]


def refused(capsys, argv, pattern):
    """train_hivg.main(argv) stops before training with exit status 2 and one error line matching `pattern`."""
    assert train_hivg.main(argv) == 2
    err = capsys.readouterr().err
    assert re.match(f"train_hivg.py: error: {pattern}", err) and err.count("\n") == 1, err


def test_an_output_dir_that_cannot_hold_a_run_is_one_line_before_training(data, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "odd" / "checkpoint.pth").mkdir(parents=True)
    proc = run_script(["train_hivg.py", *flags(data, tmp_path / "a_file", "--epochs", "1")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == (f"train_hivg.py: error: --output_dir {tmp_path / 'a_file'} is a file, not a folder; "
                                            "give an --output_dir you can write to")
    for out, message in ((Path("/proc"), "cannot be created or written"),  # unwritable, root included
                         (Path("/proc/hivg/out"), "cannot be created or written"),
                         (tmp_path / "odd", "checkpoint.pth is a folder where the run writes its checkpoint.pth "
                                            "file; move it away")):
        refused(capsys, flags(data, out, "--epochs", "1"), f"--output_dir {out}.*{message}")
    assert not (tmp_path / "odd" / "log.txt").exists()


def test_a_folder_in_use_by_a_running_run_is_refused_and_a_killed_run_leaves_no_lock(data, tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train_hivg.py", *flags(data, run, "--epochs", "500")], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert any(line.startswith("Hi LoRA stage 0") for line in first.stdout)   # it holds the folder now
        refused(capsys, flags(data, run, "--epochs", "1"), rf".*in use by a running training run \(process {first.pid}\)")
    finally:
        first.kill()
        first.wait()
    os.close(claim(run, "", overwrite=True, reads={}))   # the kernel dropped the killed run's lock


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(data, tmp_path, capsys):
    short = ["--epochs", "1", "--epoch_samples", "8", "--vl_dim_feedforward", "64"]
    assert train_hivg.main(flags(data, tmp_path, *short)) == 0
    before = {name: (tmp_path / name).stat().st_mtime_ns for name in ("best_checkpoint.pth", "log.txt")}
    refused(capsys, flags(data, tmp_path, *short), f".*holds an earlier run .*--resume {tmp_path / 'checkpoint.pth'}.*--overwrite")
    assert {name: (tmp_path / name).stat().st_mtime_ns for name in before} == before
    assert train_hivg.main(flags(data, tmp_path, *short, "--overwrite")) == 0
    assert log_epochs(tmp_path) == [0] and (tmp_path / "best_checkpoint.pth").stat().st_mtime_ns > before["log.txt"]


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """The folder of a finished run (never changed: tests work on copies)."""
    out = tmp_path_factory.mktemp("finished")
    assert train_hivg.main(flags(data, out, *SHORT)) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out, symlinks=True)
    return out


def contents(folder: Path) -> dict:
    """Every file and link below `folder` (links not followed), the lock aside: relative path -> bytes or target."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in [*files, *(d for d in dirs if os.path.islink(os.path.join(root, d)))]:
            p = Path(root, name)
            if name != ".lock":
                found[str(p.relative_to(folder))] = os.readlink(p) if p.is_symlink() else p.read_bytes()
    return found


def demo_checkpoint(path: Path) -> Path:
    """Weights of the 3-layer `demo` model: the tiny model's bridge layers do not fit them."""
    args = add_model_args(argparse.ArgumentParser()).parse_args(["--model", "demo", "--imsize", "64"])
    model = build_model(args)
    save_checkpoint(path, model_file(model, vars(args)))
    return path


def test_overwrite_deletes_nothing_when_an_input_is_bad_or_read_from_the_folder(data, finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path)
    before = contents(run)
    (tmp_path / "no_splits").mkdir()
    for extra, message in (
            (["--data_root", "/nonexistent"], "image folder /nonexistent/synthref/images for synthref train not found"),
            (["--split_root", str(tmp_path / "no_splits")], f"split file {tmp_path / 'no_splits'}/synthref/"),
            (["--retrain", str(demo_checkpoint(tmp_path / "demo.pth"))],
             ".*" + re.escape("bridge layers [1, 3, 5] out of range for the 3-layer vision tower")),
            *((["--" + flag, str(run / name)], f"--{flag} {run / name} is the earlier run's {name} in --output_dir "
                                               f"{run}, which --overwrite deletes; copy it out of the folder first")
              for flag, name in (("retrain", "best_checkpoint.pth"), ("hi_lora_retrain", "checkpoint.pth"),
                                 ("clip_model", "checkpoint.pth")))):
        refused(capsys, flags(data, run, *SHORT, "--overwrite", *extra), message)
        assert contents(run) == before, extra


def test_symbolic_links_in_the_folder_are_refused_and_never_followed(data, finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path)
    shared = tmp_path / "shared_tensorboard"
    shutil.move(run / "tensorboard", shared)
    (run / "tensorboard").symlink_to(shared)
    before, shared_before = contents(run), contents(shared)
    refused(capsys, flags(data, run, *SHORT, "--overwrite"),
            f"--output_dir {run}: {run / 'tensorboard'} is a symbolic link \\(to {shared}\\); the run writes only "
            "inside its folder: remove the link")
    assert contents(run) == before and contents(shared) == shared_before
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    for name in (".lock", "args.json"):
        fresh = tmp_path / f"fresh{name}"
        fresh.mkdir()
        (fresh / name).symlink_to(notes)
        refused(capsys, flags(data, fresh, *SHORT), f"--output_dir {fresh}: {fresh / name} is a symbolic link")
        assert notes.read_text() == "my notes\n" and sorted(os.listdir(fresh)) == sorted({".lock", name})


def test_overwrite_deletes_the_eval_results_of_the_earlier_checkpoints(data, finished, tmp_path):
    run = copy_of(finished, tmp_path)
    for name in ("eval_best_checkpoint.json", "eval_checkpoint.json", "eval_official.json"):
        (run / name).write_text("{}\n")
    (run / "vis_best_checkpoint").mkdir()
    (run / "vis_best_checkpoint" / "val_0.jpg").write_bytes(b"")
    assert train_hivg.main(flags(data, run, *SHORT, "--overwrite")) == 0
    assert sorted(p.name for p in run.glob("[ev][vi]*")) == ["eval_official.json"]   # another checkpoint's results


def test_a_run_killed_in_its_first_checkpoint_write_is_advised_only_what_exists(data, tmp_path, capsys):
    script, run = tmp_path / "killed_saving.py", tmp_path / "run"
    script.write_text(KILLED_SAVING_EPOCH.format(repo=REPO, epoch=0))
    assert run_script([str(script), *flags(data, run, *SHORT)]).returncode == -signal.SIGKILL
    assert not (run / "checkpoint.pth").exists()
    refused(capsys, flags(data, run, *SHORT), f".*holds an earlier run \\(best_checkpoint.pth, log.txt\\); continue it "
                                              f"with --resume {run / 'best_checkpoint.pth'}, give another --output_dir")
    assert train_hivg.main(["--resume", str(run / "best_checkpoint.pth")]) == 0 and log_epochs(run) == [0]
    for name in ("checkpoint.pth", "best_checkpoint.pth"):
        (run / name).unlink(missing_ok=True)   # a resumed run that had nothing left to train wrote none
    refused(capsys, flags(data, run, *SHORT), ".*holds an earlier run \\(log.txt\\); give another --output_dir, or give "
                                              "--overwrite")


def test_under_torchrun_an_error_is_one_line(data, finished, tmp_path):
    run = copy_of(finished, tmp_path)
    before = contents(run)
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "train_hivg.py"]
    for extra, message in ((["--overwrite", "--data_root", "/nonexistent"], "image folder /nonexistent/"),
                           ([], f"--output_dir {run} holds an earlier run")):
        proc = run_script([*torchrun, *flags(data, run, *SHORT, "--batch_size", "4", *extra)], timeout=300)
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert proc.returncode != 0 and len(errors) == 1 and message in errors[0], proc.stderr
        assert contents(run) == before
