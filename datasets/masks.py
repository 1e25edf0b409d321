"""Rasterisation of COCO polygons and boxes into binary masks (no pycocotools).

Convention (the one of COCO's RLE encoder for boxes): pixel (row i, column j)
covers the square [j, j + 1) x [i, i + 1) and belongs to a shape when its centre
(j + 0.5, i + 0.5) lies inside the shape. An integer box (x, y, w, h) therefore
fills exactly w x h pixels. Polygons are filled with the even-odd rule and the
polygons of one object are merged by union, as the official pipeline does with
``pycocotools.mask.decode(...).any(-1)``. Results agree with pycocotools up to
pixels whose centre lies on an edge.
"""
import math

import numpy as np


def polygons_to_mask(polygons, height: int, width: int) -> np.ndarray:
    """Fill COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` into a [height, width] bool array.

    Polygons with fewer than three points cover nothing.
    """
    mask = np.zeros((height, width), dtype=bool)
    for poly in polygons:
        pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if len(pts) >= 3:
            mask |= _fill_polygon(pts, height, width)
    return mask


def box_to_mask(box_xywh, height: int, width: int) -> np.ndarray:
    """Fill a float (x, y, w, h) box into a [height, width] bool array: the box's polygon filled by
    polygons_to_mask, computed directly (rows i with y <= i + 0.5 < y + h, likewise columns)."""
    x, y, w, h = (float(v) for v in box_xywh)
    x0, x1 = sorted((x, x + w))
    y0, y1 = sorted((y, y + h))
    mask = np.zeros((height, width), dtype=bool)
    rows = slice(*(min(max(math.ceil(v - 0.5), 0), height) for v in (y0, y1)))
    cols = slice(*(min(max(math.ceil(v - 0.5), 0), width) for v in (x0, x1)))
    mask[rows, cols] = True
    return mask


def _fill_polygon(pts: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scanline fill of one closed polygon given as [N, 2] (x, y) points."""
    mask = np.zeros((height, width), dtype=bool)
    y_lo = max(int(np.floor(pts[:, 1].min())), 0)
    y_hi = min(int(np.ceil(pts[:, 1].max())), height)
    if y_hi <= y_lo:
        return mask
    ys = np.arange(y_lo, y_hi) + 0.5                        # [R] row centres
    x0, y0 = pts[:, 0], pts[:, 1]                             # [E] edge starts
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)                 # [E] edge ends
    crosses = (y0[None] <= ys[:, None]) != (y1[None] <= ys[:, None])    # [R, E]; only where y0 != y1
    t = np.divide(ys[:, None] - y0[None], (y1 - y0)[None], out=np.zeros(crosses.shape), where=crosses)
    xs = np.where(crosses, x0[None] + t * (x1 - x0)[None], np.inf)    # [R, E]
    xs.sort(axis=1)
    # Each row has an even number of crossings; pairs (xs[2k], xs[2k+1]) bound inside runs.
    # Column j is inside a run [a, b) when a <= j + 0.5 < b, i.e. ceil(a - 0.5) <= j < ceil(b - 0.5).
    n_pairs = xs.shape[1] // 2
    starts = np.ceil(xs[:, 0:2 * n_pairs:2] - 0.5)
    ends = np.ceil(xs[:, 1:2 * n_pairs:2] - 0.5)
    valid = np.isfinite(starts) & np.isfinite(ends)
    starts = np.clip(np.where(valid, starts, 0), 0, width).astype(np.int64)
    ends = np.clip(np.where(valid, ends, 0), 0, width).astype(np.int64)
    delta = np.zeros((len(ys), width + 1), dtype=np.int64)
    rows = np.broadcast_to(np.arange(len(ys))[:, None], starts.shape)
    np.add.at(delta, (rows, starts), 1)
    np.add.at(delta, (rows, ends), -1)
    mask[y_lo:y_hi] = np.cumsum(delta, axis=1)[:, :width] > 0
    return mask
