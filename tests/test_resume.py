"""Stopping and resuming train_hivg.py: a stop at any step of an epoch, or between its end and its validation,
resumes into the log.txt and best_checkpoint.pth of an uninterrupted run; a resume never rewinds later progress;
TensorBoard shows each step once; signals under torchrun; a bug in a loader worker exits instead of hanging."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

import train_hivg
from models.checkpoint_format import FORMAT
from models.weights import read_weights
from tests.conftest import flags
from tests.test_config import LEGACY_V2
from tests.test_train import REPO, log_epochs, run_script
from utils.checkpoint import save_checkpoint
from utils.losses import GroundingCriterion

# 2 epochs of 3 optimizer steps (24 samples, batch 8)
SHORT = ["--epochs", "2", "--epoch_samples", "24", "--vl_dim_feedforward", "64"]
UNTIMED = ("time_s", "train_samples_per_s")


def log_records(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in UNTIMED}
            for line in (run_dir / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert train_hivg.main(flags(data, out, *SHORT)) == 0
    return out


def signal_at(monkeypatch, at):
    """SIGTERM to this process in micro-batch `at` of the run (1-based), or as epoch 0's validation starts."""
    micro_batches, validations = [], []
    real_forward, real_evaluate = GroundingCriterion.forward, train_hivg.evaluate

    def forward(self, outputs, targets):
        micro_batches.append(1)
        if len(micro_batches) == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(self, outputs, targets)

    def evaluate(*args, **kwargs):
        validations.append(1)
        if at == "validation" and len(validations) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(GroundingCriterion, "forward", forward)
    monkeypatch.setattr(train_hivg, "evaluate", evaluate)


@pytest.mark.parametrize("print_freq, at, resume_at", [
    (3, 3, (1, 0)),             # noticed at the check of the epoch's last step
    (2, 1, (0, 2)),             # inside the epoch: its loss means must still cover all its steps
    (2, 3, (1, 0)),             # after the last in-epoch check, before the epoch's end
    (2, "validation", (1, 0)),  # between the epoch's end and its validation
])
def test_a_stop_anywhere_in_an_epoch_resumes_into_the_uninterrupted_run(data, whole, tmp_path, monkeypatch,
                                                                         print_freq, at, resume_at):
    run = tmp_path / "run"
    signal_at(monkeypatch, at)
    assert train_hivg.main(flags(data, run, *SHORT, "--print_freq", str(print_freq))) == 128 + signal.SIGTERM
    assert read_weights(run / "checkpoint.pth").checkpoint["resume_at"] == resume_at
    assert train_hivg.main(["--resume", str(run / "checkpoint.pth")]) == 0
    assert log_records(run) == log_records(whole)           # every epoch validated and logged once, same means
    for name in ("best_checkpoint.pth", "checkpoint.pth"):
        wa, wb = read_weights(whole / name).checkpoint["model"], read_weights(run / name).checkpoint["model"]
        assert [k for k in wa if not torch.equal(wa[k], wb[k])] == [], name


def test_a_checkpoint_saved_at_an_epochs_last_step_resumes(data, tmp_path, capsys):
    """Earlier versions saved a stop at an epoch's last step as 'epoch e, step <last>': the resumed epoch runs
    no step, and is validated and logged."""
    run = tmp_path / "run"
    assert train_hivg.main(flags(data, run, "--epochs", "3", "--epoch_samples", "8", "--run_epochs", "1")) == 0
    ckpt = read_weights(run / "checkpoint.pth").checkpoint
    save_checkpoint(run / "checkpoint.pth", dict(ckpt, resume_at=(1, 1)))
    assert train_hivg.main(["--resume", str(run / "checkpoint.pth")]) == 0
    assert log_epochs(run) == [0, 1, 2]
    assert "epoch 1: loss n/a (resumed after its last step)" in capsys.readouterr().out


def test_resume_from_an_earlier_checkpoint_of_the_run_is_refused(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_hivg.main(flags(data, run, "--epochs", "3", "--epoch_samples", "8")) == 0
    earlier = dict(read_weights(run / "checkpoint.pth").checkpoint, epoch=0, resume_at=(1, 0))
    save_checkpoint(run / "best_checkpoint.pth", earlier)   # best after epoch 0
    before = {name: (run / name).read_bytes() for name in ("checkpoint.pth", "log.txt")}
    assert train_hivg.main(["--resume", str(run / "best_checkpoint.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train_hivg.py: error: --resume {run / 'best_checkpoint.pth'} would rewind the run: "
                          f"{run / 'checkpoint.pth'} is further on (epoch 3, step 0") and err.count("\n") == 1, err
    assert f"continue with --resume {run / 'checkpoint.pth'}" in err and "--retrain" in err
    assert before == {name: (run / name).read_bytes() for name in before}


def test_a_checkpoint_of_the_second_format_resumes_and_evaluates(data, tmp_path):
    """tests/checkpoints/legacy_v2_stage1 (no format key, keys nothing reads) continues in today's format."""
    from eval import main as eval_main
    run = tmp_path / "legacy_v2_stage1"
    shutil.copytree(LEGACY_V2, run)
    paths = ["--data_root", str(data), "--split_root", str(data)]
    assert train_hivg.main(["--resume", str(run / "checkpoint.pth"), *paths]) == 0
    ckpt = read_weights(run / "checkpoint.pth").checkpoint
    assert ckpt["format"] == FORMAT and ckpt["epoch"] == 1 and ckpt["resume_at"] == (2, 0)
    assert "stage" not in ckpt and ckpt["config"]["hi_lora_stage"] == 1 and log_epochs(run) == [1]
    assert eval_main(["--eval_model", str(run / "checkpoint.pth"), *paths, "--eval_set", "val"]) == 0
    assert json.loads((run / "eval_checkpoint.json").read_text())["synthref"]["val"]["count"] == 13


def scalar_events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


SIGNAL_IN_MICRO_BATCH = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import train_hivg
from utils.losses import GroundingCriterion
real, calls = GroundingCriterion.forward, []
def forward(self, outputs, targets):  # {signal} to rank {rank} alone, in its micro-batches {at}
    calls.append(1)
    if len(calls) in {at} and os.environ.get("RANK", "0") == "{rank}":
        os.kill(os.getpid(), signal.{signal})
    return real(self, outputs, targets)
GroundingCriterion.forward = forward
code = train_hivg.main()
print(f"rank {{os.environ.get('RANK', '0')}} exits {{code}}", flush=True)
sys.exit(code)
"""


def signal_script(tmp_path, signal_name: str, at: tuple, rank: int = 0):
    script = tmp_path / "signalled.py"
    script.write_text(SIGNAL_IN_MICRO_BATCH.format(repo=REPO, signal=signal_name, at=at, rank=rank))
    return str(script)


def test_tensorboard_shows_each_step_once_after_a_resume_replays_steps(data, tmp_path):
    run = tmp_path / "run"     # killed (nothing saved) in epoch 1, step 2, after its check at step 1
    killed = run_script([signal_script(tmp_path, "SIGKILL", (5,)), *flags(data, run, *SHORT, "--print_freq", "1")])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert train_hivg.main(["--resume", str(run / "checkpoint.pth")]) == 0   # replays epoch 1 from its start
    steps = scalar_events(run)
    assert steps["train_step/loss"] == [1, 2, 3, 4, 5, 6] and steps["val/acc"] == [3, 6], steps
    assert all(len(s) == len(set(s)) for s in steps.values()), steps


def test_a_resume_within_the_second_of_the_interrupted_runs_events_still_replaces_them(tmp_path):
    """The interrupted run's event file is named in this very second and by a host that sorts last: the
    resumed run's file must still sort after it, or TensorBoard reads the purge first and shows steps twice."""
    from utils.logger import RunLogger
    first = RunLogger(str(tmp_path), True, {})
    first.scalars({"loss": 1.0}, 1)
    first.scalars({"loss": 2.0}, 2)
    first.close()
    (old,) = (tmp_path / "tensorboard").iterdir()
    old.rename(old.with_name(f"events.out.tfevents.{int(time.time()):010d}.~.0.0"))
    resumed = RunLogger(str(tmp_path), True, {}, purge_step=2)
    resumed.scalars({"loss": 3.0}, 2)
    resumed.scalars({"loss": 4.0}, 3)
    resumed.close()
    assert scalar_events(tmp_path) == {"loss": [1, 2, 3]}


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_sigterm_to_one_rank_under_torchrun_stops_every_rank_cleanly(data, tmp_path):
    """Rank 1 alone gets SIGTERM after the last check of epoch 0 (print_freq 2, 3 steps): both ranks validate
    epoch 0, save, and exit 143, and rank 0 says which signal of which rank stopped the run."""
    run = tmp_path / "run"
    proc = run_script([*TORCHRUN, signal_script(tmp_path, "SIGTERM", (3,), rank=1),
                       *flags(data, run, *SHORT, "--batch_size", "4", "--print_freq", "2")], timeout=400)
    out = proc.stdout + proc.stderr
    assert "stopped by signal 15 (SIGTERM, rank 1) after epoch 0" in proc.stdout, out
    assert "rank 0 exits 143" in proc.stdout and "rank 1 exits 143" in proc.stdout, out
    assert "train_hivg.py\", line" not in out, out                   # no traceback from a rank
    assert log_epochs(run) == [0] and read_weights(run / "checkpoint.pth").checkpoint["resume_at"] == (1, 0)


def test_a_second_ctrl_c_stops_at_once_with_status_130(data, tmp_path):
    run = tmp_path / "run"     # Ctrl-C in micro-batch 1, and again in micro-batch 2: no check between them
    proc = run_script([signal_script(tmp_path, "SIGINT", (1, 2)), *flags(data, run, *SHORT, "--print_freq", "100")],
                      timeout=600)
    assert proc.returncode == 130, proc.stderr
    assert "second interrupt: stopping at once" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (run / "checkpoint.pth").exists()        # the first one alone would have saved at the epoch's end


WORKER_BUG = """
import sys
sys.path.insert(0, {repo!r})
import train_hivg
from utils.engine import EpochSeeded
def broken(self, idx):
    raise RuntimeError("a bug in the dataset")
EpochSeeded.__getitem__ = broken
sys.exit(train_hivg.main())
"""


def test_a_bug_in_a_loader_worker_exits_with_its_traceback(data, tmp_path):
    script = tmp_path / "worker_bug.py"
    script.write_text(WORKER_BUG.format(repo=REPO))
    try:
        proc = run_script([str(script), *flags(data, tmp_path / "run", *SHORT, "--num_workers", "1")], timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("train_hivg.py hung after a loader worker raised")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr and "RuntimeError: Caught RuntimeError in DataLoader worker" in proc.stderr
    assert "a bug in the dataset" in proc.stderr
