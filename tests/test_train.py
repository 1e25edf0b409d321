"""train_hivg.py on a tiny model and a tiny synthetic set: learning, Hi LoRA stages, resume,
signals, atomic writes, torchrun equivalence (bad input: test_train_errors.py)."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_hivg
from models.checkpoint_format import FORMAT
from models.convert import convert_official_state_dict
from models.lora import merge_lora_state_dict
from models.weights import load_model, read_file, read_weights
from utils.checkpoint import leftover_temporaries, save_checkpoint
from tests.conftest import FIXTURES, flags
from utils.engine import ShardSampler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, **kw)


def test_loss_goes_down_and_logs(stage0):
    log = [json.loads(line) for line in (stage0 / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    args = json.loads((stage0 / "args.json").read_text())
    assert args["hi_lora_stage"] == 0 and args["model"] == "tiny"
    ckpt = read_weights(stage0 / "checkpoint.pth").checkpoint
    assert set(ckpt) == {"format", "model", "config", "args", "optimizer", "scheduler", "scaler", "rng", "epoch",
                         "resume_at", "best_acc", "step_base", "stage_end_step"} and ckpt["format"] == FORMAT
    assert ckpt["config"]["bridge_layers"] == [1, 3, 5] and ckpt["config"]["image_size"] == 64
    assert ckpt["epoch"] == 2 and ckpt["resume_at"] == (3, 0)
    assert any((stage0 / "tensorboard").iterdir())


def changed_keys(before: dict, after: dict):
    return {k for k in after if k not in before or not torch.equal(before[k], after[k])}


def test_each_hi_lora_stage_trains_only_its_parameters(stage0, tmp_path):
    prev = stage0 / "best_checkpoint.pth"
    for stage in (1, 2, 3):
        out = tmp_path / f"s{stage}"
        assert train_hivg.main(["--hi_lora_retrain", str(prev), "--epochs", "1", "--output_dir", str(out)]) == 0
        previous = read_weights(prev).checkpoint
        before = merge_lora_state_dict(previous["model"], alpha=previous["config"]["lora_alpha"])
        ckpt = read_weights(out / "checkpoint.pth").checkpoint
        assert ckpt["config"]["hi_lora_stage"] == stage and ckpt["args"]["dataset"] == "synthref"
        model = load_model(out / "checkpoint.pth", merge=False)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        changed = changed_keys(before, ckpt["model"])
        assert changed <= trainable
        adapted = {k.split(".")[4] for k in changed if ".lora_" in k and k.startswith("clip.visual.")}
        assert adapted == {str(i) for i in range(2 * stage)}  # tiny: 6 layers, groups of 2
        assert not any(k.startswith("clip.transformer.") for k in changed)
        prev = out / "best_checkpoint.pth"


def test_official_checkpoint_starts_the_next_stage(data, tmp_path):
    fixture = FIXTURES / "hivg_tiny_unc_stage1"   # the authors' model after Hi LoRA stage 1 (official mode)
    config = json.loads((fixture / "config.json").read_text())
    src = tmp_path / "official.pth"
    torch.save({"model": torch.load(fixture / "checkpoint.pth", weights_only=True)["model"],
                "args": argparse.Namespace(**config["hivg_args"])}, src)
    out = tmp_path / "stage2"
    assert train_hivg.main(["--hi_lora_retrain", str(src), "--hf_clip_config", str(fixture / "config.json"),
                            "--dataset", "synthref", "--data_root", str(data), "--split_root", str(data),
                            "--epochs", "1", "--batch_size", "8", "--num_workers", "0", "--output_dir", str(out)]) == 0
    ckpt = read_weights(out / "checkpoint.pth").checkpoint
    assert ckpt["config"]["hi_lora_stage"] == 2 and ckpt["args"]["hi_lora_mode"] == "official"
    model = load_model(out / "checkpoint.pth", merge=False)   # no flag needed any more: the config travels along
    assert model.config.clip == ckpt["config"]["clip"] and len(model.clip.visual.transformer.resblocks) == 12
    official = convert_official_state_dict(torch.load(src, weights_only=False)["model"], model.state_dict())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "clip.visual.transformer.resblocks.11.attn.lora_in.lora_A" in frozen   # stage 2 trains layers 0-7
    assert all(torch.equal(ckpt["model"][k], official[k]) for k in frozen)         # loaded, not re-initialised
    assert json.loads((out / "log.txt").read_text().splitlines()[0])["epoch"] == 0
    with pytest.raises(SystemExit):
        train_hivg.resolve_args(["--hf_clip_config", str(fixture / "config.json"), "--output_dir", str(tmp_path)])


def test_warmup_run_then_stage0_with_fresh_bridges(data, tmp_path, capsys):
    warm, out = tmp_path / "warm", tmp_path / "stage0"   # tiny has no bridges in warmup, as ViT-L/14
    assert train_hivg.main(flags(data, warm, "--epochs", "1", "--warmup")) == 0
    before = read_weights(warm / "checkpoint.pth").checkpoint["model"]
    assert not any(k.startswith("bridges.") for k in before)
    # lr 0: stage 0 must hold exactly the warmup weights plus new bridges
    assert train_hivg.main(flags(data, out, "--epochs", "1", "--lr", "0", "--retrain", str(warm / "checkpoint.pth"))) == 0
    after = read_weights(out / "checkpoint.pth").checkpoint["model"]
    bridges = {k for k in after if k.startswith("bridges.")}
    assert bridges and set(after) - set(before) == bridges
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert f"{len(bridges)} fresh tensors (new adapters, bridges)" in capsys.readouterr().out


def test_epoch_samples_draws_a_fresh_subset_each_epoch():
    def sampler(rank=0, world=1, epoch=0, epoch_samples=24):
        s = ShardSampler(50, rank, world, shuffle=True, seed=3, batch_size=4, drop_last=True, epoch_samples=epoch_samples)
        s.epoch = epoch
        return s.indices()

    e0, e1 = sampler(), sampler(epoch=1)
    assert len(e0) == len(set(e0)) == 24 and len(e1) == 24 and set(e0) != set(e1)
    assert e0 == sampler(epoch_samples=0)[:24]                       # a prefix of the epoch's permutation
    assert sorted(sampler(0, 2) + sampler(1, 2)) == sorted(e0)       # split over ranks, nothing repeated
    assert len(sampler(epoch_samples=500)) == 48                     # capped by the split (then cut to batches)


def test_resume_is_exact(data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    short = ["--epochs", "2", "--epoch_samples", "16", "--vl_dim_feedforward", "64"]
    assert train_hivg.main(flags(data, a, *short)) == 0
    assert train_hivg.main(flags(data, b, *short, "--run_epochs", "1")) == 0
    assert read_weights(b / "checkpoint.pth").checkpoint["resume_at"] == (1, 0)
    assert train_hivg.main(["--resume", str(b / "checkpoint.pth")]) == 0  # keeps writing into b
    wa, wb = (read_weights(run / "checkpoint.pth").checkpoint["model"] for run in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)   # exact on any CPU: one process, the same kernels and shapes


SIGTERM_IN_MICRO_BATCH = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import train_hivg
from utils.losses import GroundingCriterion
real, calls = GroundingCriterion.forward, []
def forward(self, outputs, targets):  # rank 0 alone is signalled, in its micro-batch {at}
    calls.append(1)
    if len(calls) == {at} and os.environ.get("RANK", "0") == "0":
        os.kill(os.getpid(), signal.SIGTERM)
    return real(self, outputs, targets)
GroundingCriterion.forward = forward
sys.exit(train_hivg.main())
"""


@pytest.mark.parametrize("ranks", [1, 2])
def test_resume_inside_an_epoch_is_exact(data, tmp_path, ranks):
    """With dropout on, a run stopped by SIGTERM inside an epoch and resumed ends with the very weights of a
    run never stopped: the loaders draw nothing from the generator the dropout masks come from."""
    script = tmp_path / "sigterm_in_micro_batch.py"
    script.write_text(SIGTERM_IN_MICRO_BATCH.format(repo=REPO, at=2))
    launch = [] if ranks == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    common = ["--epochs", "2", "--epoch_samples", "24", "--batch_size", str(8 // ranks), "--print_freq", "1",
              "--vl_dim_feedforward", "64"]                                 # 3 steps per epoch, a check after each
    whole = run_script([*launch, "train_hivg.py", *flags(data, tmp_path / "whole", *common)])
    assert whole.returncode == 0, whole.stderr
    stopped = run_script([*launch, str(script), *flags(data, tmp_path / "stopped", *common)])
    assert read_weights(tmp_path / "stopped" / "checkpoint.pth").checkpoint["resume_at"] == (0, 2), stopped.stderr
    resumed = run_script([*launch, "train_hivg.py", "--resume", str(tmp_path / "stopped" / "checkpoint.pth")])
    assert resumed.returncode == 0, resumed.stderr
    wa = read_weights(tmp_path / "whole" / "checkpoint.pth").checkpoint["model"]
    wb = read_weights(tmp_path / "stopped" / "checkpoint.pth").checkpoint["model"]
    # Exact on any CPU: both sides run the same kernels (one environment, one thread, the same ranks and batches).
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def test_sigterm_saves_a_loadable_checkpoint(data, tmp_path):
    proc = subprocess.Popen([sys.executable, "train_hivg.py", *flags(data, tmp_path, "--epochs", "500")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("epoch 0:"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, rest
    ckpt = read_weights(tmp_path / "checkpoint.pth").checkpoint
    load_model(tmp_path / "checkpoint.pth")
    assert ckpt["resume_at"][0] >= 1 and "continue with --resume" in rest


DIE = """
import os, signal, sys, torch
sys.path.insert(0, {repo!r})
class Die:  # pickling it is a SIGKILL in the middle of a checkpoint write
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)
"""
KILLER = DIE + """
from utils.checkpoint import save_checkpoint
save_checkpoint({path!r}, {{"model": {{"w": torch.zeros(1000000)}}, "die": Die()}})
"""
KILLED_SAVING_EPOCH = DIE + """
import train_hivg
real = train_hivg.save_checkpoint
def save(path, obj):  # killed while writing checkpoint.pth of epoch {epoch}, after its log.txt record
    real(path, dict(obj, die=Die()) if path.name == "checkpoint.pth" and obj["epoch"] == {epoch} else obj)
train_hivg.save_checkpoint = save
sys.exit(train_hivg.main())
"""


def test_killed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    proc = run_script(["-c", KILLER.format(repo=REPO, path=str(path))])
    assert proc.returncode == -signal.SIGKILL
    assert torch.equal(read_file(path)["model"]["w"], torch.ones(3))


@pytest.mark.recorded
def test_two_rank_gloo_run_equals_one_rank(data, tmp_path):
    common = ["--epochs", "1", "--vl_dropout", "0"]
    one = run_script(["train_hivg.py", *flags(data, tmp_path / "one", *common)])
    assert one.returncode == 0, one.stderr
    two = run_script(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "train_hivg.py",
                      *flags(data, tmp_path / "two", *common, "--batch_size", "4")])
    assert two.returncode == 0, two.stderr
    assert "2 ranks x 4 x 1 accum = 8" in two.stdout
    assert_same_weights(tmp_path / "one" / "checkpoint.pth", tmp_path / "two" / "checkpoint.pth")


def assert_same_weights(path_a, path_b):
    """Two runs that are one computation in exact arithmetic (the gradient summed over ranks or micro-batches in
    another order, or on another device) end with the same weights up to rounding, as amplified by AdamW: it
    moves every weight by about lr per step, whatever the scale of its gradient.

    Key biases (the k third of every in_proj_bias: CLIP towers, bridges, fusion) are left out: their exact
    gradient is zero (softmax ignores a shift shared by all keys), so AdamW turns rounding noise into steps of
    up to about lr there (its first step is lr * g / (|g| + eps)). Elsewhere rounding changes a gradient by a
    tiny fraction of itself, except where it moves a ReLU input across 0 or where the gradient is a sum that
    nearly cancels: then AdamW turns the difference into a step of up to about lr for that weight. Measured on
    the rest: at most 1.8e-3 * lr * steps (1 vs 2 gloo ranks, one batch vs two micro-batches, 1 and 2 threads;
    lr 1e-3, 6 steps); the exceptions hit a few fusion FFN input weights per data set (at most 18 of 65536 in a
    tensor, 0.03%). The tolerance, 2e-2 * lr * steps, is ten times the first, and at most 0.1% of a tensor may
    exceed it, while leaving out one batch of 8 moves 84% of the weights by more.
    """
    ca, cb = read_weights(path_a).checkpoint, read_weights(path_b).checkpoint
    steps = int(next(iter(ca["optimizer"]["state"].values()))["step"])
    atol = 2e-2 * ca["args"]["lr"] * steps
    w1, w2 = ca["model"], cb["model"]
    assert w1.keys() == w2.keys()
    for k in w1:
        a, b = w1[k], w2[k]
        if k.endswith("in_proj_bias"):
            d = a.shape[0] // 3
            a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
        beyond = ((a - b).abs() > atol).sum().item()
        assert beyond <= 1e-3 * a.numel(), f"{k}: {beyond} of {a.numel()} weights differ by more than {atol:.2e}"


@pytest.mark.recorded
def test_accumulated_micro_batches_equal_one_batch(data, tmp_path):
    common = ["--epochs", "1", "--vl_dropout", "0"]
    assert train_hivg.main(flags(data, tmp_path / "one", *common)) == 0
    assert train_hivg.main(flags(data, tmp_path / "acc", *common, "--batch_size", "4", "--accum_steps", "2")) == 0
    assert_same_weights(tmp_path / "one" / "checkpoint.pth", tmp_path / "acc" / "checkpoint.pth")


def test_plain_progress_lines_when_not_on_a_terminal(data, tmp_path, capsys):
    assert train_hivg.main(flags(data, tmp_path, "--epochs", "1", "--print_freq", "2")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("stage 0 epoch 0 step")]
    assert [line.split()[5] for line in lines] == ["2/6", "4/6", "6/6"]       # 48 samples / batch 8
    assert all(" loss " in line and "loss_bbox" in line and "samples/s ETA" in line for line in lines)


def test_checkpoints_get_the_umask_mode_not_a_private_one(tmp_path):
    previous = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "a.pth", {"model": {"w": torch.ones(1)}})
    finally:
        os.umask(previous)
    assert (tmp_path / "a.pth").stat().st_mode & 0o777 == 0o640


def test_flags_without_effect_say_so(data, tmp_path):
    proc = run_script(["train_hivg.py", *flags(data, tmp_path, "--epochs", "1", "--epoch_samples", "8", "--model",
                                               "demo", "--warmup", "--save_hilora_clip", "--hi_lora_clip", "x.pth")])
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 3 and "--warmup changes nothing for --model demo" in warnings[2]
    assert "--save_hilora_clip has no effect" in proc.stderr and "--hi_lora_clip has no effect" in proc.stderr
    help_text = run_script(["train_hivg.py", "--help"]).stdout
    assert "(default: 0.0001)" in help_text and "--optimizer" not in help_text


def scalar_steps(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_tensorboard_steps_run_on_across_hi_lora_stages(data, tmp_path):
    s0, s1 = tmp_path / "s0", tmp_path / "s1"
    assert train_hivg.main(flags(data, s0, "--epochs", "1", "--print_freq", "2")) == 0
    assert train_hivg.main(["--hi_lora_retrain", str(s0 / "best_checkpoint.pth"), "--output_dir", str(s1)]) == 0
    assert scalar_steps(s0, "train_step/loss") == [2, 4, 6] and scalar_steps(s0, "val/acc") == [6]
    assert scalar_steps(s1, "train_step/loss_bbox") == [8, 10, 12]      # 6 steps per epoch, stage 1 from 6
    assert scalar_steps(s1, "val/acc") == [6, 12]                       # the inherited model, then epoch 0
    assert read_weights(s1 / "checkpoint.pth").checkpoint["stage_end_step"] == 12


def test_a_run_killed_between_its_two_writes_keeps_its_best_checkpoint(data, tmp_path, monkeypatch):
    """The first epoch is always the best so far: it writes both files, and a kill between the two writes
    must not lose best_checkpoint.pth (the next Hi LoRA stage starts from it)."""
    real, calls = train_hivg.save_checkpoint, []

    def killed_at_the_second_write(path, obj):
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt(f"killed before writing {path.name}")
        real(path, obj)

    monkeypatch.setattr(train_hivg, "save_checkpoint", killed_at_the_second_write)
    with pytest.raises(KeyboardInterrupt):
        train_hivg.main(flags(data, tmp_path, "--epochs", "1"))
    assert read_weights(tmp_path / "best_checkpoint.pth").checkpoint["epoch"] == 0


def test_resume_refuses_flags_it_cannot_honour(data, tmp_path, capsys):
    assert train_hivg.main(flags(data, tmp_path, "--epochs", "2", "--run_epochs", "1")) == 0
    assert train_hivg.main(["--resume", str(tmp_path / "checkpoint.pth"), "--lr", "1e30", "--epochs", "3"]) == 2
    assert "cannot change --epochs, --lr" in capsys.readouterr().err


def log_epochs(run_dir):
    return [json.loads(line)["epoch"] for line in (run_dir / "log.txt").read_text().splitlines()]


def test_a_run_killed_while_saving_resumes_with_each_epoch_logged_once_and_no_temporaries(data, tmp_path):
    script, run = tmp_path / "killed_saving.py", tmp_path / "run"
    script.write_text(KILLED_SAVING_EPOCH.format(repo=REPO, epoch=1))
    small = ["--epochs", "3", "--epoch_samples", "8", "--vl_dim_feedforward", "64"]
    killed = run_script([str(script), *flags(data, run, *small)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert log_epochs(run) == [0, 1] and read_weights(run / "checkpoint.pth").checkpoint["epoch"] == 0
    assert leftover_temporaries(run / "checkpoint.pth")                 # what the kill left behind
    assert train_hivg.main(["--resume", str(run / "checkpoint.pth")]) == 0  # replays epoch 1
    assert log_epochs(run) == [0, 1, 2]
    assert leftover_temporaries(run / "checkpoint.pth") == []
