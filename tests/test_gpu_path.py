"""What would break only on a GPU, checked with CPU stand-ins, and the same checks on CUDA (marker `cuda`,
skipped without a device; benchmarks/gpu_check.sh runs them): host syncs in the training loop, tensors
made off the device, pinned batches, TF32 switches, bf16 autocast, fused AdamW, a short run on CUDA."""
import argparse
import copy
import inspect
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader

import eval as eval_script
import train_hivg
from datasets import build_dataset
from datasets.collate import Batch
from datasets.tokens import tokenize
from models.flags import add_model_args
from models.hivg import build_model, text_length
from models.weights import read_weights
from tests.conftest import REPO, flags, is_project_source
from tests.test_train import assert_same_weights
from utils.engine import LossMeter, NonFiniteLossError, ShardSampler, make_loader, set_tf32, train_one_epoch
from utils.losses import build_criterion

PHRASES = ["the red ball", "a dog on the left of the small car", "cup", "the man in a blue shirt", "left", "tree"]
# Tensor -> host reads: each one waits for the device's queued work when the tensor lives on a GPU.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "__format__")


def on_cuda(test):
    """Marker `cuda` (benchmarks/gpu_check.sh runs these), skipped without a CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def tiny_model(device="cpu"):
    torch.manual_seed(0)
    args = add_model_args(argparse.ArgumentParser()).parse_args(
        ["--model", "tiny", "--imsize", "64", "--max_query_len", "16", "--vl_dim_feedforward", "64",
         "--vl_dropout", "0", "--use_rtcc_constrain_loss", "--use_mask_loss"])
    model = build_model(args)
    model.freeze_heads_without_loss()
    return model.to(device), build_criterion(args)


def batches(n: int, size: int = 2):
    """n synthetic batches whose phrases differ in length (the text length changes from batch to batch)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        texts = [PHRASES[(i + j) % len(PHRASES)] for j in range(size)]
        obj = torch.zeros(size, 64, 64)
        obj[:, 16:40, 20:44] = 1
        out.append(Batch(torch.randn(size, 3, 64, 64, generator=g), torch.zeros(size, 64, 64, dtype=torch.int32),
                         tokenize(texts, 16), torch.tensor([[0.5, 0.45, 0.4, 0.4]] * size), obj, texts))
    return out


def epoch(model, criterion, loader, device="cpu", **kw):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)   # as on CUDA: no host read of the step count
    return train_one_epoch(model, criterion, loader, optimizer=optimizer, device=torch.device(device),
                           show_progress=False, log=lambda line: None, **kw), optimizer


def our_frame(frame):
    """The innermost frame of this repository's code (not its tests, not the venv) on the stack, or None."""
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if is_project_source(path):
            return frame
        frame = frame.f_back
    return None


@contextmanager
def host_reads(log: list, steps: list):
    """Record (optimizer steps done, file, function) of every host read of a tensor made while our code runs,
    library code called by ours included (charged to our innermost caller). `.to(device)` is not counted:
    the loop's copies go host -> device."""
    saved = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            frame = our_frame(sys._getframe(1))
            if frame is not None:
                path = Path(frame.f_code.co_filename).relative_to(REPO).as_posix()
                log.append((steps[0], path, frame.f_code.co_name))
            return real(self, *args, **kwargs)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_no_host_sync_between_checks(accum_steps):
    model, criterion = tiny_model()
    log, steps = [], [0]
    loader = batches(4 * accum_steps)
    with host_reads(log, steps):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
        optimizer.register_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
        stats = train_one_epoch(model, criterion, loader, optimizer=optimizer, device=torch.device("cpu"),
                                accum_steps=accum_steps, show_progress=False, print_freq=2, log=lambda line: None)
    assert stats["steps"] == 4
    # The checks: one all-ranks read after optimizer steps 2 and 4, and the epoch's summary.
    assert [r for r in log if r[1] != "models/hivg.py"] == [(2, "utils/engine.py", "means")] + \
        [(4, "utils/engine.py", "means")] * 2
    # The model's one read per forward: the batch's text length (models/hivg.py, text_length).
    assert [r[1:] for r in log if r[1] == "models/hivg.py"] == [("models/hivg.py", "text_length")] * len(loader)


def test_a_non_finite_loss_stops_the_epoch_at_the_next_check():
    model, criterion = tiny_model()
    calls, real = [], criterion.forward

    def poisoned(outputs, targets):  # NaN from the 2nd micro-batch on
        calls.append(1)
        losses = real(outputs, targets)
        return {k: v * float("nan") for k, v in losses.items()} if len(calls) > 1 else losses

    criterion.forward = poisoned
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        epoch(model, criterion, batches(6), print_freq=3)
    assert len(calls) == 3   # stopped at the check after step 3, not at the epoch's end


def test_a_stop_request_ends_the_epoch_at_the_next_check():
    model, criterion = tiny_model()
    calls = []

    def stop_requested():  # always asked for, but read only at the checks
        calls.append(1)
        return True

    stats, optimizer = epoch(model, criterion, batches(6), print_freq=3, stop_requested=stop_requested)
    assert stats["interrupted"] == 1.0 and stats["steps"] == 3 and len(calls) == 1
    stats, _ = epoch(model, criterion, batches(3), print_freq=0, stop_requested=stop_requested)
    assert stats["interrupted"] == 1.0 and stats["steps"] == 1   # print_freq 0: a check after every step


class OffDevice(TorchDispatchMode):
    """Records the ops whose results land on the meta device (the default device during the step)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in tree_leaves(out)):
            self.ops.append(str(func))
        return out


def test_a_step_makes_every_tensor_on_the_device():
    """A tensor made without device= inside a CUDA step lands on the CPU (an error, or a hidden copy and sync
    for a 0-d one). Stand-in: the default device is meta while CPU steps run; nothing may land there."""
    model, criterion = tiny_model()
    loader = batches(3)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    kw = dict(show_progress=False, log=lambda line: None, print_freq=1)
    train_one_epoch(model, criterion, loader[:1], optimizer=optimizer, device=torch.device("cpu"),
                    **kw)  # optimizer state
    with torch.device("meta"), OffDevice() as mode:
        stats = train_one_epoch(model, criterion, loader[1:], optimizer=optimizer, device=torch.device("cpu"),
                                accum_steps=2, **kw)
    assert mode.ops == [] and stats["steps"] == 1
    tensors = list(model.state_dict().values()) + tree_leaves(optimizer.state_dict())
    assert not any(t.is_meta for t in tensors if isinstance(t, torch.Tensor))


def test_tf32_switches_only_on_cuda():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        set_tf32(torch.device("cpu"), not saved[0])
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved
        for on in (True, False):
            set_tf32(torch.device("cuda"), on)
            assert torch.backends.cuda.matmul.allow_tf32 is on and torch.backends.cudnn.allow_tf32 is on
            assert torch.get_float32_matmul_precision() == ("high" if on else "highest")  # readable by inductor
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    args = train_hivg.get_args_parser().parse_args([])
    assert args.tf32 and not args.compile
    opts = eval_script.get_args_parser().parse_args(["--eval_model", "x.pth", "--no-tf32", "--compile"])
    assert not opts.tf32 and opts.compile


def test_the_train_loader_pins_memory_on_cuda_only():
    for device, pinned in (("cpu", False), ("cuda", True)):
        loader = make_loader([], None, batch_size=2, context_length=16, num_workers=0, device=torch.device(device),
                             seed=0)
        assert loader.pin_memory is pinned


# ---- On a CUDA device (pytest -m cuda; benchmarks/gpu_check.sh) ----

@on_cuda
def test_bf16_autocast_training_step_on_cuda():
    model, criterion = tiny_model("cuda")
    fp32 = copy.deepcopy(model)
    loader = batches(1, size=4)
    bf16_stats, _ = epoch(model, criterion, loader, "cuda", amp="bf16", print_freq=1)
    fp32_stats, _ = epoch(fp32, criterion, loader, "cuda", print_freq=1)
    # bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%); a loss summed from six terms, each through
    # some twenty layers of bf16 matmuls, stays within a few percent of fp32.
    assert bf16_stats["loss"] == pytest.approx(fp32_stats["loss"], rel=5e-2)
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.device.type == "cuda" and torch.isfinite(p).all()


@on_cuda
def test_fused_adamw_on_cuda_matches_the_plain_loop():
    model, criterion = tiny_model("cuda")
    other = copy.deepcopy(model)
    nets = [(m, [p for p in m.parameters() if p.requires_grad]) for m in (model, other)]
    fused = torch.optim.AdamW(nets[0][1], lr=1e-3, weight_decay=1e-4, fused=True)
    plain = torch.optim.AdamW(nets[1][1], lr=1e-3, weight_decay=1e-4, foreach=False)
    for batch in batches(3, size=4):
        batch = batch.to("cuda")
        out = model(batch.images, batch.pixel_mask, batch.ids)
        sum(criterion(out, {"boxes": batch.boxes, "obj_masks": batch.obj_masks}).values()).backward()
        for p, q in zip(nets[0][1], nets[1][1]):
            q.grad = None if p.grad is None else p.grad.clone()
        fused.step()
        plain.step()
        fused.zero_grad()
        plain.zero_grad()
    # Same gradients, same formula: only rounding differs, far below one update (lr = 1e-3).
    for p, q in zip(nets[0][1], nets[1][1]):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@on_cuda
def test_no_host_sync_between_checks_on_cuda():
    """torch.cuda's sync debug mode reports every synchronizing call, with the Python line that made it."""
    def lines(fn):
        source, first = inspect.getsourcelines(inspect.unwrap(fn))
        return Path(inspect.getsourcefile(inspect.unwrap(fn))).name, range(first, first + len(source))

    model, criterion = tiny_model("cuda")
    loader = DataLoader(batches(6), batch_size=None, pin_memory=True)   # pinned, as train_hivg's loader on CUDA
    syncs, steps = [], [0]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    train_one_epoch(model, criterion, batches(1), optimizer=optimizer, device=torch.device("cuda"),
                    show_progress=False, log=lambda line: None)   # first use: library handles, optimizer state
    optimizer.register_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, *rest: syncs.append(
            (steps[0], Path(filename).name, lineno, str(message)[:80]))
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_one_epoch(model, criterion, loader, optimizer=optimizer, device=torch.device("cuda"),
                            show_progress=False, print_freq=3, log=lambda line: None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    (meter_file, meter_lines), (model_file, model_lines) = lines(LossMeter.means), lines(text_length)
    checks = {s for s, f, n, _ in syncs if f == meter_file and n in meter_lines}
    model_syncs = [r for r in syncs if r[1] == model_file and r[2] in model_lines]
    others = [r for r in syncs if not (r[1] == meter_file and r[2] in meter_lines) and r not in model_syncs]
    assert others == [] and checks == {3, 6}, syncs
    assert len(model_syncs) == len(loader)   # the text length, read once per forward


@on_cuda
def test_two_step_run_on_cuda_matches_the_cpu_run(small_data, tmp_path):
    common = ["--epochs", "1", "--vl_dropout", "0", "--no-tf32"]   # 16 samples: 2 steps of 8
    assert train_hivg.main(flags(small_data, tmp_path / "cpu", *common, "--device", "cpu")) == 0
    assert train_hivg.main(flags(small_data, tmp_path / "cuda", *common, "--device", "cuda", "--num_workers", "2")) == 0
    assert_same_weights(tmp_path / "cpu" / "checkpoint.pth", tmp_path / "cuda" / "checkpoint.pth")
    ckpt = read_weights(tmp_path / "cuda" / "checkpoint.pth").checkpoint
    assert ckpt["args"]["device"] == "cuda" and ckpt["optimizer"]["param_groups"][0]["fused"]


@on_cuda
def test_the_train_loader_pins_batches_on_cuda(small_data, tmp_path):
    args, _ = train_hivg.resolve_args(flags(small_data, tmp_path, "--num_workers", "2"))
    dataset = build_dataset("train", args)
    loader = make_loader(dataset, ShardSampler(len(dataset)), batch_size=4, context_length=args.max_query_len,
                         num_workers=args.num_workers, device=torch.device("cuda"), seed=0)
    batch = next(iter(loader))
    assert all(t.is_pinned() for t in batch[:5])
