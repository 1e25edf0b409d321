"""Binary masks of COCO segmentations (polygons, RLE) and of boxes.

Polygons are rasterised by pycocotools (``frPyObjects`` + ``decode``, the union over an object's polygons), as
the authors' loader does: for segmentation the ground truth is what the metric is computed against, so it is
COCO's own (docs/method.md, section 10).

Boxes keep their own fill, the target of the box-supervised mask losses since the first release: pixel
(row i, column j) covers the square [j, j + 1) x [i, i + 1) and belongs to the box when its centre
(j + 0.5, i + 0.5) lies inside. An integer box (x, y, w, h) fills exactly its w x h pixels. This equals
pycocotools' fill of the box's polygon, pixel for pixel, except where an edge lies exactly on a pixel centre
(x.5), whose tie pycocotools may break the other way (tests/test_data_transforms.py).
"""
import math

import numpy as np
from pycocotools import mask as coco_mask


def polygons_to_mask(polygons, height: int, width: int) -> np.ndarray:
    """COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` -> [height, width] bool array, the union of their
    pycocotools rasterisations. Polygons with fewer than three points cover nothing; a list that is not
    polygons of (x, y) pairs raises ValueError or TypeError."""
    polys = []
    for poly in polygons:
        pts = np.asarray(poly, dtype=np.float64)
        if pts.ndim != 1 or len(pts) % 2:
            raise ValueError(f"a polygon must be a flat list of x, y pairs, got shape {pts.shape}")
        if len(pts) >= 6:     # frPyObjects would read 4 numbers as a box
            polys.append(pts.tolist())
    if not polys:
        return np.zeros((height, width), dtype=bool)
    return coco_mask.decode(coco_mask.frPyObjects(polys, height, width)).any(axis=-1)


def rle_to_mask(rle: dict, height: int, width: int) -> np.ndarray:
    """[height, width] bool array of a COCO RLE {"size": [h, w], "counts"} (counts compressed or not)."""
    if isinstance(rle["counts"], list):
        rle = coco_mask.frPyObjects(rle, *rle["size"])
    counts = rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]
    decoded = coco_mask.decode({"size": rle["size"], "counts": counts}).astype(bool)
    if decoded.shape != (height, width):
        raise ValueError(f"its RLE size {decoded.shape[1]}x{decoded.shape[0]} is not the image's {width}x{height}")
    return decoded


def segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO segmentation, polygons (a list) or RLE (a dict), as a [height, width] bool array."""
    if isinstance(segmentation, dict):
        return rle_to_mask(segmentation, height, width)
    return polygons_to_mask(segmentation, height, width)


def box_to_mask(box_xywh, height: int, width: int) -> np.ndarray:
    """Fill a float (x, y, w, h) box into a [height, width] bool array: rows i with y <= i + 0.5 < y + h,
    likewise columns (the module docstring's pixel-centre rule)."""
    x, y, w, h = (float(v) for v in box_xywh)
    x0, x1 = sorted((x, x + w))
    y0, y1 = sorted((y, y + h))
    mask = np.zeros((height, width), dtype=bool)
    rows = slice(*(min(max(math.ceil(v - 0.5), 0), height) for v in (y0, y1)))
    cols = slice(*(min(max(math.ceil(v - 0.5), 0), width) for v in (x0, x1)))
    mask[rows, cols] = True
    return mask
