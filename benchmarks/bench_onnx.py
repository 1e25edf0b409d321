"""CPU inference: eager PyTorch (our fast path: merged LoRA, SDPA, the box head, text up to the last EOT)
against onnxruntime on the exported graph (export.py), ViT-B/16 with random weights, in one alternating run.

    python benchmarks/bench_onnx.py [--threads N] [--rounds 5] [--json OUT] [--profile OUT_PREFIX]

Batch 1 latency (median ms) and batch 8 throughput (samples/s over the median batch time); the two runtimes
alternate round by round so that a busy machine slows both alike. --profile writes onnxruntime's operator
profile (JSON) of the batch-8 runs and prints the operators' share of the time. Results: docs/benchmarks.md.
"""
import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import export  # noqa: E402
from datasets.tokens import tokenize  # noqa: E402
from models.export import INPUT_NAMES, ExportHiVG  # noqa: E402
from models.flags import add_model_args  # noqa: E402
from models.hivg import build_model  # noqa: E402
from models.lora import merge_lora  # noqa: E402
from utils.onnx_grounder import onnxruntime_module  # noqa: E402

TEXTS = ["the man in the red shirt on the left", "a dog", "the second car from the right behind the bus"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def inputs(model, batch: int):
    S = model.image_size
    pixel_mask = torch.zeros(batch, S, S, dtype=torch.int32)
    pixel_mask[:, :S // 8] = 1                                   # a letterboxed frame
    return (torch.randn(batch, 3, S, S), pixel_mask,
            tokenize([TEXTS[i % len(TEXTS)] for i in range(batch)], model.context_length))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def operator_profile(path: str) -> list:
    """(operator type, share of the node time) from an onnxruntime profile, largest first."""
    totals = collections.Counter()
    for event in json.loads(Path(path).read_text()):
        if event.get("cat") == "Node" and "op_name" in event.get("args", {}):
            totals[event["args"]["op_name"]] += event["dur"]
    whole = sum(totals.values()) or 1
    return [(op, round(t / whole, 3)) for op, t in totals.most_common(8)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser("bench_onnx.py")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--profile", help="prefix of onnxruntime's profile file (batch 8)")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    model = build_model(add_model_args(argparse.ArgumentParser()).parse_args(["--model", "ViT-B/16"]))
    merge_lora(model)
    model.eval()
    module = ExportHiVG(model)
    path = Path(tempfile.mkdtemp()) / "b16.onnx"
    export_s = timed(lambda: export.export_onnx(module, path, checkpoint="random"))
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.intra_op_num_threads = opts.threads
    if opts.profile:
        options.enable_profiling, options.profile_file_prefix = True, opts.profile
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    result = {"cpu": cpu_name(), "threads": opts.threads, "export_s": round(export_s, 1)}
    for batch in (1, 8):
        feeds = inputs(model, batch)
        numpy_feeds = dict(zip(INPUT_NAMES, (t.numpy() for t in feeds)))
        with torch.inference_mode():
            runs = {"eager": lambda: model(*feeds, outputs=("box",)),
                    "onnxruntime": lambda: session.run(["pred_box"], numpy_feeds)}
            times = {name: [] for name in runs}
            for name, run in runs.items():           # warm-up
                run()
            for _ in range(opts.rounds):
                for name, run in runs.items():
                    times[name].append(timed(run))
        for name, ts in times.items():
            median = statistics.median(ts)
            result[f"{name}_b{batch}"] = round(median * 1000, 1) if batch == 1 else round(batch / median, 2)
    if opts.profile:
        result["onnxruntime_profile"] = operator_profile(session.end_profiling())
    print(json.dumps(result))
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
