"""Time a HiVG training step or evaluation forward on random weights and inputs.

    python benchmarks/bench_model.py --model ViT-B/16 --batch_size 8 --mode eval [--reference] [--json OUT]
    python benchmarks/bench_model.py --mode train --stage 3 --amp bf16 --device cuda [--compile] [--no-tf32]

Reports samples/s (median step time over --steps after --warmup steps), peak memory (process peak RSS
on CPU, peak allocated on CUDA), FLOPs per sample (torch.utils.flop_counter on the work actually done)
and the achieved share of a matmul peak measured in the same run. Each path runs in its own process so
that peak memory is its own. `--reference` also runs the plain path (eager attention, unmerged LoRA,
fp32, every head) and prints both side by side. `--compile` times the torch.compile'd model (FLOPs are
counted on the eager step, which does the same work; `warmup_s` then includes the compilation).

Configuration as the reference figures: dataset unc, adaptive weights, the three auxiliary losses.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.tokens import tokenize  # noqa: E402
from models.attention import eager_attention  # noqa: E402
from models.flags import add_model_args  # noqa: E402
from models.hivg import build_model  # noqa: E402
from models.lora import merge_lora  # noqa: E402
from utils.distributed import resolve_device  # noqa: E402
from utils.engine import set_tf32  # noqa: E402
from utils.flags import add_device_arg, add_speed_args  # noqa: E402
from utils.losses import GroundingCriterion  # noqa: E402

KEYS = ("samples_per_s", "peak_mem_mb", "flops_per_sample", "matmul_gflops", "share_of_peak")


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, reps: int = 5) -> float:
    """Best GFLOP/s of an n x n x n matmul in `dtype` (the run's compute dtype) on this device and thread count;
    n = 8192 on CUDA, where a 2048 product is too short to reach a large card's peak."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_model(opts, device):
    args = add_model_args(argparse.ArgumentParser()).parse_args(
        ["--model", opts.model, "--dataset", "unc", "--imsize", str(opts.imsize), "--hi_lora_stage", str(opts.stage),
         "--use_contrastive_loss", "--use_rtcc_constrain_loss", "--use_mask_loss"])
    torch.manual_seed(0)
    model = build_model(args).to(device)
    with torch.no_grad():  # random adapters, so that unmerged LoRA does real work
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model


def make_batch(opts, model, device):
    B, S = opts.batch_size, opts.imsize
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, S, S, generator=g).to(device)
    mask = torch.zeros(B, S, S, dtype=torch.int32)
    mask[::2, :, S * 3 // 4:] = 1
    texts = [f"the {c} object on the left of the small dog number {i}" for i, c in
             zip(range(B), ["red", "blue", "green", "white"] * B)]
    boxes = torch.rand(B, 2, generator=g) * 0.4 + 0.3
    boxes = torch.cat([boxes, torch.full((B, 2), 0.3)], dim=1).to(device)
    obj = torch.zeros(B, S, S)
    obj[:, S // 4:S // 2, S // 4:S // 2] = 1
    return images, mask.to(device), tokenize(texts, model.context_length).to(device), boxes, obj.to(device)


def make_step(opts, model, device, *, reference: bool):
    """The timed work as a function of the module that runs it (the model, or its compiled wrapper)."""
    images, mask, ids, boxes, obj = make_batch(opts, model, device)
    amp_dtype = None if reference else {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[opts.amp]

    def amp():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    attention = eager_attention if reference else nullcontext
    if opts.mode == "eval":
        model.eval()
        if not reference:
            merge_lora(model)
        outputs = None if reference else ["box"]

        def step(net):
            with torch.no_grad(), amp(), attention():
                net(images, mask, ids, outputs=outputs)
        return step, amp_dtype
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, fused=device.type == "cuda")
    criterion = GroundingCriterion(heads=model.outputs)  # the heads of make_model's flags

    def step(net):
        with amp(), attention():
            out = net(images, mask, ids)
            loss = sum(criterion(out, {"boxes": boxes, "obj_masks": obj}).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, amp_dtype


def single_run(opts) -> dict:
    device = resolve_device(opts.device)
    torch.set_num_threads(opts.threads) if opts.threads else None
    set_tf32(device, opts.tf32)
    model = make_model(opts, device)
    reference = opts.path == "reference"
    step, amp_dtype = make_step(opts, model, device, reference=reference)
    with FlopCounterMode(display=False) as counter:
        step(model)
    flops = counter.get_total_flops()
    net = torch.compile(model, backend=opts.compile_backend) if opts.compile and not reference else model
    t = time.perf_counter()
    for _ in range(opts.warmup):
        step(net)
    _sync(device)
    warmup = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(opts.steps):
        _sync(device)
        t = time.perf_counter()
        step(net)
        _sync(device)
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_rate = matmul_gflops(device, amp_dtype or torch.float32)
    return {"samples_per_s": opts.batch_size / median, "step_s": median, "warmup_s": warmup, "peak_mem_mb": peak,
            "flops_per_sample": flops / opts.batch_size, "matmul_gflops": peak_rate,
            "share_of_peak": flops / median / 1e9 / peak_rate}


def run_in_child(argv, path) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--path", path], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"the {path} path failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B/16")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--imsize", type=int, default=224)
    parser.add_argument("--mode", choices=("train", "eval"), default="eval")
    parser.add_argument("--stage", type=int, default=0, choices=[0, 1, 2, 3])
    add_speed_args(parser)
    parser.add_argument("--compile_backend", default="inductor",
                        help="torch.compile backend; eager: dynamo's tracing only, no code generation (the GPU "
                             "check's dry run)")
    add_device_arg(parser, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--reference", action="store_true", help="also run the plain path, side by side")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--path", choices=("fast", "reference"),
                        help="run only this path, in this process, and print its results as one JSON line")
    opts = parser.parse_args(argv)
    if opts.path:  # one path, one JSON line (each path of the side-by-side mode runs so, in a child process)
        print(json.dumps(single_run(opts)))
        return
    argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--reference"]
    if "--json" in argv:
        i = argv.index("--json")
        del argv[i:i + 2]
    results = {"fast": run_in_child(argv, "fast")}
    if opts.reference:
        results["reference"] = run_in_child(argv, "reference")
    device = resolve_device(opts.device).type
    print(f"{opts.model} {opts.mode} stage {opts.stage} batch {opts.batch_size} amp {opts.amp} on {device}"
          f"{' compiled' if opts.compile else ''}{' tf32' if opts.tf32 and device == 'cuda' else ''}")
    print(f"{'path':<10}" + "".join(f"{k:>18}" for k in KEYS))
    for name, r in results.items():
        print(f"{name:<10}" + "".join(f"{r[k]:>18.3f}" for k in KEYS))
    if opts.reference:
        f, r = results["fast"], results["reference"]
        print(f"speed-up {f['samples_per_s'] / r['samples_per_s']:.2f}x, memory {f['peak_mem_mb'] / r['peak_mem_mb']:.2f}x")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"config": vars(opts), **results}, indent=1))


if __name__ == "__main__":
    main()
