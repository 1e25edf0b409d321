"""Images per second of one data-loading worker running the training transform.

    python benchmarks/bench_data.py [--imsize 224] [--num 200]

Two sources, both made here in a temporary folder: the synthetic set (datasets.synthetic) and
COCO-sized 640x480 JPEGs in the official `unc` layout. For the JPEGs the rate is given with full
decoding (the default, the authors' pixels) and with --fast_jpeg (reduced-size draft decoding).
Transform flags as the official recipe: --aug_crop --aug_scale --aug_translate.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.refer import add_data_args, build_dataset  # noqa: E402
from datasets.synthetic import generate  # noqa: E402


def make_coco_like(root: Path, num: int) -> None:
    """`num` 640x480 photo-like JPEGs and a unc-layout train split pointing at them."""
    images = root / "other/images/mscoco/images/train2014"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    refs = []
    for i in range(num):
        base = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((640, 480), Image.BICUBIC)
        name = f"COCO_train2014_{i:012d}.jpg"
        img.save(images / name, quality=90)
        refs.append((name, {"height": 480, "width": 640}, [100.0, 120.0, 200.0, 150.0], "the thing on the left", []))
    (root / "unc").mkdir()
    torch.save(refs, root / "unc" / "unc_train.pth")


def rate(dataset, num: int) -> float:
    dataset[0]
    t = time.perf_counter()
    for i in range(num):
        dataset[i % len(dataset)]
    return num / (time.perf_counter() - t)


def data_args(dataset: str, root: Path, imsize: int, *, extra: tuple = ()):
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    return parser.parse_args(["--dataset", dataset, "--data_root", str(root), "--split_root", str(root),
                              "--imsize", str(imsize), "--aug_crop", "--aug_scale", "--aug_translate", *extra])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imsize", type=int, default=224)
    parser.add_argument("--num", type=int, default=200, help="samples timed per source")
    opts = parser.parse_args()
    torch.set_num_threads(1)  # one worker's share
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(str(tmp / "synth"), num_train=opts.num, num_val=10, num_test=10)
        make_coco_like(tmp / "coco", opts.num)
        synth = build_dataset("train", data_args("synthref", tmp / "synth", opts.imsize))
        coco = build_dataset("train", data_args("unc", tmp / "coco", opts.imsize))
        coco_fast = build_dataset("train", data_args("unc", tmp / "coco", opts.imsize, extra=("--fast_jpeg",)))
        print(f"train transform at imsize {opts.imsize}, one process, 1 thread")
        print(f"synthetic set:                 {rate(synth, opts.num):8.1f} images/s")
        print(f"640x480 JPEG (full decode):    {rate(coco, opts.num):8.1f} images/s")
        print(f"640x480 JPEG (--fast_jpeg):    {rate(coco_fast, opts.num):8.1f} images/s")


if __name__ == "__main__":
    main()
