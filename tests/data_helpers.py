"""Hand-made grounding data in every official layout, and pixel checks on transformed records."""
import argparse
import os

import numpy as np
import torch
from PIL import Image

from datasets import add_data_args
from datasets.refer import IMAGE_DIRS
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD

RED = (230, 20, 20)
BACKGROUND = (40, 40, 40)
DISTRACTORS = ((20, 200, 40), (30, 60, 230))

# Target objects in pixels of a 640 x 480 image: a red rectangle, with a red triangle as its polygon mask
# when `triangle` is set. Distractors are green / blue rectangles well apart from the target.
TARGET_XYWH = (180.6, 140.2, 220.9, 160.7)
DISTRACTOR_XYWH = ((20, 20, 100, 80), (500, 330, 110, 120))


def args_for(dataset, root, **overrides):
    """A data namespace as the training script builds it, rooted at `root`."""
    args = add_data_args(argparse.ArgumentParser()).parse_args(
        ["--dataset", dataset, "--data_root", str(root), "--split_root", str(root)])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def triangle_polygon(x, y, w, h):
    """COCO polygon of a triangle inscribed in the box (apex up)."""
    return [[x, y + h, x + w / 2, y, x + w, y + h]]


def draw_scene(path, size_wh=(640, 480), target=TARGET_XYWH, triangle=False, fmt=None):
    """Write an image: dark background, red target (rectangle or triangle), two distractors."""
    w, h = size_wh
    img = np.empty((h, w, 3), np.uint8)
    img[:] = BACKGROUND
    for (x, y, bw, bh), colour in zip(DISTRACTOR_XYWH, DISTRACTORS):
        img[int(y):int(y + bh), int(x):int(x + bw)] = colour
    from datasets.masks import box_to_mask, polygons_to_mask
    mask = polygons_to_mask(triangle_polygon(*target), h, w) if triangle else box_to_mask(target, h, w)
    img[mask] = RED
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path, **({"quality": 95} if (fmt or path).endswith(("jpg", "jpeg")) else {}))


def coco_entry(name, phrase="the red box", triangle=False, box=TARGET_XYWH):
    return (name, {"height": 480, "width": 640}, list(box), phrase,
            triangle_polygon(*box) if triangle else [[0.0, 0.0, 1.0, 0.0, 1.0, 1.0]])


def xyxy(box):
    x, y, w, h = box
    return [x, y, x + w, y + h]


def write_layout(root, dataset, splits=("train", "val"), n=3, triangle=False):
    """Hand-made split files and images for `dataset` under root (data_root = split_root = root)."""
    os.makedirs(os.path.join(root, dataset), exist_ok=True)
    for split in splits:
        entries = []
        for i in range(n):
            if dataset in ("unc", "unc+", "gref", "gref_umd", "synthref"):
                name = f"COCO_train2014_{split}{i:06d}.jpg"
                draw_scene(os.path.join(root, IMAGE_DIRS["synthref" if dataset == "synthref" else "coco"], name),
                           triangle=triangle)
                entries.append(coco_entry(name, triangle=triangle))
            elif dataset == "referit":
                name = f"{split}{i}.jpg"
                draw_scene(os.path.join(root, IMAGE_DIRS["referit"], name))
                entries.append((name, f"{split}{i}_1.pth", xyxy(TARGET_XYWH), "the red box", []))
            elif dataset == "flickr":
                name = f"{split}{i}.jpg"
                draw_scene(os.path.join(root, IMAGE_DIRS["flickr"], name))
                entries.append((name, xyxy(TARGET_XYWH), "a red box"))
            else:  # mixup: one image of each source per index
                coco, fl, ri = f"COCO_train2014_m{split}{i}.jpg", f"m{split}{i}.jpg", f"m{split}{i}.png"
                draw_scene(os.path.join(root, IMAGE_DIRS["coco"], coco), triangle=triangle)
                draw_scene(os.path.join(root, IMAGE_DIRS["flickr"], fl))
                draw_scene(os.path.join(root, IMAGE_DIRS["referit"], ri))
                entries += [coco_entry(coco, triangle=triangle),
                            (fl, "flickr", list(TARGET_XYWH), "the red box", None),
                            (ri, "referit", list(TARGET_XYWH), "the red box", None)]
        torch.save(entries, os.path.join(root, dataset, f"{dataset}_{split}.pth"))
    return root


def to_uint8(image):
    """[3, S, S] normalised tensor -> [S, S, 3] float array in 0..255 (numpy: no torch threads in tests)."""
    rgb = image.numpy().transpose(1, 2, 0)
    return (rgb * np.float32(IMAGENET_STD) + np.float32(IMAGENET_MEAN)) * 255


def red_map(image):
    """[S, S] bool: pixels whose red channel clearly dominates (robust to colour jitter)."""
    rgb = to_uint8(image)
    return (rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2])) > 20


def box_pixels(record):
    """The record's box as integer pixel bounds (x0, y0, x1, y1) in the padded frame."""
    s = record.image.shape[-1]
    cx, cy, w, h = (record.box * s).tolist()
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def assert_box_on_red(record, inner=1, outer=2, tol=0.9):
    """Each edge of the box lies on the red object's edge.

    The first and last row and column inside the box (``inner`` pixels in) are red; the rows and
    columns ``outer`` pixels outside it are not (where they fall on the image). Returns False when
    the box is too small to check.
    """
    red = red_map(record.image)
    image = record.pixel_mask.numpy() == 0
    x0, y0, x1, y1 = box_pixels(record)
    r0, r1 = int(np.ceil(y0)) + inner, int(np.floor(y1)) - inner - 1
    c0, c1 = int(np.ceil(x0)) + inner, int(np.floor(x1)) - inner - 1
    if r1 - r0 < 2 or c1 - c0 < 2:
        return False
    for line in (red[r0, c0:c1 + 1], red[r1, c0:c1 + 1], red[r0:r1 + 1, c0], red[r0:r1 + 1, c1]):
        assert line.mean() >= tol, f"box edge off the object ({record.phrase}, box {x0:.1f} {y0:.1f} {x1:.1f} {y1:.1f})"
    s = red.shape[0]
    rows, cols = slice(r0, r1 + 1), slice(c0, c1 + 1)
    for r, c in ((int(np.floor(y0)) - outer - 1, cols), (int(np.ceil(y1)) + outer, cols),
                 (rows, int(np.floor(x0)) - outer - 1), (rows, int(np.ceil(x1)) + outer)):
        index = r if isinstance(r, int) else c
        if 0 <= index < s:
            line, valid = red[r, c], image[r, c]
            if valid.sum() > 2:
                assert line[valid].mean() <= 1 - tol, f"object extends beyond the box ({record.phrase})"
    return True


def erode(mask, radius):
    """Binary erosion of a [S, S] bool array with a square of side 2 radius + 1 (outside counts as False)."""
    padded = np.pad(mask, radius, constant_values=False)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * radius + 1, 2 * radius + 1))
    return windows.all(axis=(-1, -2))


def assert_mask_on_red(record, radius=3, tol=0.97):
    """Object-mask pixels are red and non-mask image pixels are not (away from the mask's edge)."""
    red = red_map(record.image)
    obj = record.obj_mask.numpy() > 0.5
    image = record.pixel_mask.numpy() == 0
    core = erode(obj, radius)
    outside = erode(~obj & image, radius)
    if core.any():
        assert red[core].mean() >= tol
    assert (~red[outside]).mean() >= tol
