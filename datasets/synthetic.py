"""Embedded synthetic grounding set ``synthref`` (the offline default).

    python -m datasets.synthetic --out DIR [--num_train 4000 --num_val 500 --num_test 500
                                            --seed 0 --imsize 128 --refs_per_image 2]
    python -m datasets.synthetic --baseline DIR [--split test]

Writes, in the official ``unc`` tuple layout (size dict, xywh box, phrase, COCO polygons):

    DIR/synthref/images/synthref_<split>_<n>.jpg
    DIR/synthref/synthref_<split>.pth           split files, read with --data_root DIR --split_root DIR --dataset synthref
    DIR/synthref/synthref_<split>_scenes.json   every object of every image and the category of every expression

Scenes hold 3-5 well separated flat-coloured shapes (circle, square, triangle, star;
red, green, blue, yellow, white; small or large, 26-50% of the short image side) on a
muted textured background. Images are ``imsize`` on the long side, the short side 70-100%
of it. Each expression picks exactly one object (see :mod:`datasets.synthref_lang`).
Everything is a function of (seed, split, image index), so outputs are reproducible
byte for byte. ``--baseline`` reports the Acc@0.5 of trivial predictors on a split.
"""
import argparse
import io
import json
import math
import multiprocessing
import os
import random
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

from .masks import polygons_to_mask
from .refer import IMAGE_DIRS, split_path
from .synthref_lang import Obj, expressions_for

COLOURS = {"red": (220, 40, 40), "green": (40, 175, 60), "blue": (45, 90, 235),
           "yellow": (240, 215, 40), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": (0.26, 0.32), "large": (0.42, 0.50)}     # extent / short image side
CATEGORY_WEIGHTS = {"attribute": 0.25, "size": 0.15, "location": 0.25, "relation": 0.25, "mixed": 0.10}
# What an expression of each category needs: its colour/shape/size words alone pick the object, or they
# leave several candidates and the location or relation words decide (datasets.synthref_lang).
GROUPS = {"attribute": "attributes only", "size": "attributes only", "location": "location or relation",
          "relation": "location or relation", "mixed": "location or relation"}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
RENDER_BLOCK = 256      # most images rendered per round


def shape_polygon(shape: str, cx: float, cy: float, *, r: float, angle: float) -> np.ndarray:
    """[N, 2] outline of a shape of circumradius r centred at (cx, cy), rotated by angle (rad)."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        radii = np.full_like(t, r)
    elif shape == "square":
        t = np.arange(4) * np.pi / 2 + np.pi / 4 + angle
        radii = np.full_like(t, r)
    elif shape == "triangle":
        t = np.arange(3) * 2 * np.pi / 3 - np.pi / 2 + angle
        radii = np.full_like(t, r)
    else:
        t = np.arange(10) * np.pi / 5 - np.pi / 2 + angle
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return np.stack([cx + radii * np.cos(t), cy + radii * np.sin(t)], axis=1)


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """[h, w, 3] float muted texture: stripes, checks or blobs over a low-saturation base."""
    base = rng.uniform(60, 150) + rng.uniform(-12, 12, size=3)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    kind = rng.integers(3)
    if kind == 0:
        theta, period = rng.uniform(0, np.pi), rng.uniform(6, 20)
        pattern = np.sin((x * np.cos(theta) + y * np.sin(theta)) * 2 * np.pi / period)
    elif kind == 1:
        cell = rng.integers(6, 16)
        pattern = ((x // cell + y // cell) % 2) * 2 - 1.0
    else:
        pattern = np.zeros((h, w))
        for _ in range(6):
            bx, by, s = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, 30)
            pattern += np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * s * s)) * rng.choice([-1, 1])
    img = base + rng.uniform(10, 22) * pattern[..., None] + rng.normal(0, 5, size=(h, w, 3))
    return img


def place_objects(rng: random.Random, w: int, h: int):
    """3-5 objects and their polygons on a w x h canvas, none overlapping (3 px gap at least); a layout
    where fewer than 3 fit is drawn again."""
    while True:
        colours = rng.sample(list(COLOURS), rng.randint(2, 4))
        shapes = rng.sample(SHAPES, rng.randint(2, 3))
        objs, polys = [], []
        for _ in range(rng.randint(3, 5)):
            for _try in range(60):
                size = rng.choice(list(SIZES))
                r = rng.uniform(*SIZES[size]) * min(w, h) / 2
                angle = rng.uniform(-0.3, 0.3)
                cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
                pts = shape_polygon(shape := rng.choice(shapes), cx, cy, r=r, angle=angle)
                x0, y0 = math.floor(pts[:, 0].min()), math.floor(pts[:, 1].min())
                x1, y1 = math.ceil(pts[:, 0].max()), math.ceil(pts[:, 1].max())
                if all(x0 >= o.box[2] + 3 or x1 + 3 <= o.box[0] or y0 >= o.box[3] + 3 or y1 + 3 <= o.box[1]
                       for o in objs):
                    objs.append(Obj(shape=shape, colour=rng.choice(colours), size=size, box=(x0, y0, x1, y1)))
                    polys.append(pts)
                    break
        if len(objs) >= 3:
            return objs, polys


def make_scene(rng: random.Random, nrng: np.random.Generator, long_side: int):
    """Image array and objects with their polygons (place_objects).

    An object's box is the tight box of its pixels (polygon filled with the rule of datasets.masks).
    """
    short = round(long_side * rng.uniform(0.7, 1.0))
    w, h = (long_side, short) if rng.random() < 0.5 else (short, long_side)
    objs, polys = place_objects(rng, w, h)
    img = background(nrng, h, w)
    for k, (o, pts) in enumerate(zip(objs, polys)):
        mask = polygons_to_mask([pts.ravel()], h, w)
        img[mask] = np.asarray(COLOURS[o.colour]) + nrng.normal(0, 6, size=(int(mask.sum()), 3))
        ys, xs = np.nonzero(mask)
        objs[k] = o._replace(box=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    return np.clip(img, 0, 255).astype(np.uint8), objs, polys


def pick_expression(rng: random.Random, found: dict):
    """A category drawn by CATEGORY_WEIGHTS among those with a valid expression, then one expression."""
    cats = [c for c in CATEGORY_WEIGHTS if found[c]]
    if not cats:
        return None
    cat = rng.choices(cats, weights=[CATEGORY_WEIGHTS[c] for c in cats])[0]
    return cat, rng.choice(found[cat])


def render_image(seed: int, split: str, index: int, imsize: int, refs_per_image: int):
    """Image `index` of a split: (JPEG bytes, (h, w), objects, polygons, [(target, category, phrase)]).

    A function of its arguments only, so images can be rendered in any order and in any process; an image
    none of whose objects has a valid expression comes back with no expressions.
    """
    rng = random.Random(f"{seed}-{split}-{index}")
    nrng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    img, objs, polys = make_scene(rng, nrng, imsize)
    chosen = []
    for target in rng.sample(range(len(objs)), len(objs)):
        picked = pick_expression(rng, expressions_for(objs, target, side=min(img.shape[:2])))
        if picked is not None:
            chosen.append((target, *picked))
        if len(chosen) == refs_per_image:
            break
    jpeg = io.BytesIO()
    if chosen:
        Image.fromarray(img).save(jpeg, format="JPEG", quality=92)
    return jpeg.getvalue(), img.shape[:2], objs, polys, chosen


def _render(job):
    return render_image(*job)


def generate_split(out: str, split: str, num: int, *, seed: int, imsize: int, refs_per_image: int, pool=None):
    """Render images until ``num`` expressions exist; returns (samples, scenes metadata).

    Images are rendered in blocks (in `pool` when given) and taken in index order, so the output does not
    depend on the number of processes.
    """
    image_dir = os.path.join(out, IMAGE_DIRS["synthref"])
    samples, scenes, categories = [], {}, []
    index = 0
    while len(samples) < num:
        size = min(RENDER_BLOCK, (num - len(samples)) // refs_per_image + 16)    # about what is still needed
        block = [(seed, split, i, imsize, refs_per_image) for i in range(index, index + size)]
        index += size
        rendered = pool.map(_render, block, chunksize=8) if pool else map(_render, block)
        for (_, _, i, _, _), (jpeg, (h, w), objs, polys, chosen) in zip(block, rendered):
            chosen = chosen[:num - len(samples)]
            if not chosen:
                continue
            name = f"synthref_{split}_{i:06d}.jpg"
            with open(os.path.join(image_dir, name), "wb") as f:
                f.write(jpeg)
            for target, category, phrase in chosen:
                x0, y0, x1, y1 = objs[target].box
                polygon = [round(float(v), 2) for v in polys[target].ravel()]
                samples.append((name, {"height": h, "width": w}, [float(x0), float(y0), float(x1 - x0),
                                                                  float(y1 - y0)], phrase, [polygon]))
                categories.append(category)
            scenes[name] = [{"shape": o.shape, "colour": o.colour, "size": o.size, "box_xyxy": list(o.box)}
                            for o in objs]
    return samples, {"images": scenes, "categories": categories}


def generate(out: str, *, num_train=4000, num_val=500, num_test=500, seed=0, imsize=128, refs_per_image=2,
             workers: int = 1, log=lambda message: None):
    """Write the three splits under ``out`` with `workers` processes, calling `log` after each; returns
    {split: number of samples}."""
    for split, num in (("train", num_train), ("val", num_val), ("test", num_test)):
        if num <= 0:
            raise ValueError(f"--num_{split} must be positive, got {num}")
    os.makedirs(os.path.join(out, IMAGE_DIRS["synthref"]), exist_ok=True)
    counts, start = {}, time.time()
    with multiprocessing.Pool(workers) if workers > 1 else nullcontext() as pool:
        for split, num in (("train", num_train), ("val", num_val), ("test", num_test)):
            counts[split] = write_split(out, split, num, seed=seed, imsize=imsize,
                                         refs_per_image=refs_per_image, pool=pool)
            log(f"synthref {split}: {counts[split]} expressions ({time.time() - start:.1f}s)")
    return counts


def write_split(out: str, split: str, num: int, *, seed: int, imsize: int, refs_per_image: int, pool) -> int:
    samples, meta = generate_split(out, split, num, seed=seed, imsize=imsize,
                                   refs_per_image=refs_per_image, pool=pool)
    torch.save(samples, split_path(out, "synthref", split))
    with open(os.path.join(out, "synthref", f"synthref_{split}_scenes.json"), "w") as f:
        json.dump(meta, f)
    return len(samples)


def expression_groups(root: str, split: str) -> list:
    """The group (GROUPS) of every expression of a split, in split-file order."""
    path = os.path.join(root, "synthref", f"synthref_{split}_scenes.json")
    with open(path) as f:
        return [GROUPS[c] for c in json.load(f)["categories"]]


def _head_words(phrase: str) -> dict:
    """Colour, shape and size words of the head description (before any location or relation)."""
    head = {}
    for word in phrase.split():
        if word in ("to", "above", "below", "on", "at"):
            break
        for key, vocab in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES)):
            if word in vocab:
                head[key] = word
    return head


def baselines(out: str, split: str = "test") -> dict:
    """Acc@0.5 of trivial predictors on a split, over all expressions and per group (GROUPS):
    {"all" | group: {predictor: fraction in [0, 1]}}.

    centre: a box of the mean train box size (relative to the image) centred in the image.
    largest: the largest object of the scene.
    random_object: expected accuracy of a uniformly drawn object.
    attribute_only: expected accuracy of a uniformly drawn object among those matching the
    head's colour/shape/size words (location and relation words ignored).
    """
    samples = torch.load(split_path(out, "synthref", split), weights_only=True)
    train = torch.load(split_path(out, "synthref", "train"), weights_only=True)
    with open(os.path.join(out, "synthref", f"synthref_{split}_scenes.json")) as f:
        scenes = json.load(f)["images"]
    rel_w = float(np.mean([s[2][2] / s[1]["width"] for s in train]))
    rel_h = float(np.mean([s[2][3] / s[1]["height"] for s in train]))
    rows = []                                                  # per expression: {predictor: expected hit}
    for name, size, (x, y, w, h), phrase, _ in samples:
        W, H = size["width"], size["height"]
        objs = scenes[name]
        boxes = torch.tensor([o["box_xyxy"] for o in objs], dtype=torch.float64)            # [K, 4]
        centre = torch.tensor([[W * (1 - rel_w) / 2, H * (1 - rel_h) / 2, W * (1 + rel_w) / 2, H * (1 + rel_h) / 2]],
                              dtype=torch.float64)
        candidates = torch.cat([centre, boxes])                                                  # [1 + K, 4]
        hit = box_iou(torch.tensor([[x, y, x + w, y + h]], dtype=torch.float64), candidates)[0] >= 0.5
        head = _head_words(phrase)
        matching = torch.tensor([all(o[k] == v for k, v in head.items()) for o in objs])
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        rows.append({"centre": float(hit[0]), "largest": float(hit[1:][areas.argmax()]),
                     "random_object": float(hit[1:].double().mean()),
                     "attribute_only": float(hit[1:][matching].double().mean()) if matching.any() else 0.0})
    groups = expression_groups(out, split)
    result = {}
    for group in ["all"] + list(dict.fromkeys(GROUPS.values())):
        sel = [r for r, g in zip(rows, groups) if group in ("all", g)]
        result[group] = {k: sum(r[k] for r in sel) / max(len(sel), 1) for k in rows[0]}
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate the synthref grounding set, or score trivial baselines on it.")
    parser.add_argument("--out", help="output folder; use it as --data_root and --split_root")
    parser.add_argument("--baseline", metavar="DIR", help="print trivial-baseline Acc@0.5 on a generated set")
    parser.add_argument("--split", default="test", choices=list(SPLIT_IDS), help="split for --baseline")
    parser.add_argument("--num_train", type=int, default=4000)
    parser.add_argument("--num_val", type=int, default=500)
    parser.add_argument("--num_test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--imsize", type=int, default=128, help="long side of the images in pixels")
    parser.add_argument("--refs_per_image", type=int, default=2, help="expressions per image (different objects)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="rendering processes (the output is the same for any number)")
    args = parser.parse_args(argv)
    if bool(args.out) == bool(args.baseline):
        parser.error("give exactly one of --out DIR (generate) or --baseline DIR (score)")
    if args.baseline:
        if not os.path.isfile(split_path(args.baseline, "synthref", args.split)):
            parser.error(f"no synthref split file under {args.baseline}; generate it with --out {args.baseline}")
        table = baselines(args.baseline, args.split)
        print(f"{args.split} Acc@0.5 of trivial predictors: " + " | ".join(f"{g}" for g in table))
        for name in table["all"]:
            print(f"  {name:15s} " + " | ".join(f"{100 * table[g][name]:6.2f}%" for g in table))
        return
    if args.imsize < 32:
        parser.error(f"--imsize {args.imsize} is too small to draw separated objects (use 32 or more)")
    start = time.time()
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    try:    # before any rendering, so that a folder we cannot write is one line, not a traceback
        images = os.path.join(args.out, IMAGE_DIRS["synthref"])
        os.makedirs(images, exist_ok=True)
        tempfile.TemporaryFile(dir=images).close()
    except OSError as e:
        parser.exit(2, f"{parser.prog}: error: --out {args.out} cannot be created or written ({e.strerror}); "
                       "give a folder you can write to\n")
    counts = generate(args.out, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test,
                      seed=args.seed, imsize=args.imsize, refs_per_image=args.refs_per_image,
                      workers=args.workers, log=lambda message: print(message, flush=True))
    print(f"wrote synthref to {args.out} in {time.time() - start:.1f}s: "
          + ", ".join(f"{k} {v}" for k, v in counts.items())
          + f"; use --dataset synthref --data_root {args.out} --split_root {args.out}")


if __name__ == "__main__":
    main()
