"""Referring image segmentation metrics of the segmentation head, at the original image's resolution.

The definitions of LAVT (Yang et al., CVPR 2022) and CRIS (Wang et al., CVPR 2022): mIoU, the mean of the
per-sample IoU; oIoU, the cumulative intersection over the cumulative union; precision at IoU 0.5 ... 0.9, the
share of samples whose IoU reaches the threshold (LAVT's `>=`). A sample whose masks are both empty has IoU 0
(a miss, as a zero-area box is for Acc@0.5). Beside them, `box_mask_miou`: the mIoU of the predicted box
filled as a mask, the bar the head has to clear (docs/method.md, section 10).

Per sample (`segmentation_metric`): the predicted mask is the head's logits with the eval transform undone
(datasets.transforms.Letterbox.mask_to_original, probability 0.5); the ground truth is the sample's mask
at its original size (datasets.collate.Batch.original_masks). Intersections and unions are pixel counts,
held in float64 (exact), so the evaluation's sums in dataset order give the same result for any number of ranks.
"""
from typing import Dict, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from datasets.masks import box_to_mask
from datasets.transforms import Letterbox

PRECISION_IOUS = (0.5, 0.6, 0.7, 0.8, 0.9)


def intersection_union(pred: np.ndarray, truth: np.ndarray) -> tuple:
    """Pixel counts (|pred & truth|, |pred | truth|) of two [H, W] bool masks."""
    return int(np.count_nonzero(pred & truth)), int(np.count_nonzero(pred | truth))


def iou_of(intersection: Tensor, union: Tensor) -> Tensor:
    """Per-sample IoU [B] of counts [B]; 0 where the union is empty."""
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.zeros_like(union))


def filled_box(letterbox: Letterbox, box_cxcywh: Tensor) -> np.ndarray:
    """A predicted box [4] (normalised cxcywh in the padded frame) filled as an [H, W] mask of the original
    image, with the box target's fill (datasets.masks.box_to_mask)."""
    x0, y0, x1, y1 = letterbox.to_original(box_cxcywh).tolist()
    return box_to_mask((x0, y0, x1 - x0, y1 - y0), letterbox.height, letterbox.width)


def segmentation_metric(outputs: Mapping[str, Tensor], targets: Mapping[str, object]) -> Dict[str, Tensor]:
    """Per-sample values [B] (float64) of 'seg_map' [B, 1, h, w] and 'pred_box' [B, 4] against 'original_masks'
    (B [H, W] bool arrays); 'obj_masks' [B, S, S] gives the input side S. Their means over a split are turned
    into the reported metrics by `segmentation_summary`."""
    truths: Sequence[np.ndarray] = targets["original_masks"]
    if any(t is None for t in truths):
        raise ValueError("mask metrics need each sample's original mask: evaluate a split built for evaluation "
                         "(datasets.build_dataset keeps them outside training splits)")
    size = targets["obj_masks"].shape[-1]
    counts = []
    for logits, box, truth in zip(outputs["seg_map"][:, 0], outputs["pred_box"], truths):
        letterbox = Letterbox.of(truth.shape[1], truth.shape[0], size)
        counts.append(intersection_union(letterbox.mask_to_original(logits), truth)
                      + intersection_union(filled_box(letterbox, box), truth))
    inter, union, box_inter, box_union = torch.tensor(counts, dtype=torch.float64).reshape(-1, 4).unbind(1)
    iou = iou_of(inter, union)
    precision = {f"mask_prec@{t}": (iou >= t).double() for t in PRECISION_IOUS}
    return {"mask_iou": iou, "mask_intersection": inter, "mask_union": union, **precision,
            "box_mask_iou": iou_of(box_inter, box_union)}


def segmentation_summary(means: Dict[str, float]) -> Dict[str, float]:
    """The means of `segmentation_metric`'s values over a split -> mask_miou, mask_oiou (mean intersection over
    mean union: the cumulative ratio), mask_prec@t and box_mask_miou; other entries of `means` are kept."""
    if "mask_union" not in means:    # nothing evaluated
        return means
    rest = {k: v for k, v in means.items() if not k.startswith(("mask_", "box_mask_"))}
    union = means["mask_union"]
    oiou = means["mask_intersection"] / union if union else 0.0
    return {**rest, "mask_miou": means["mask_iou"], "mask_oiou": oiou,
            **{f"mask_prec@{t}": means[f"mask_prec@{t}"] for t in PRECISION_IOUS},
            "box_mask_miou": means["box_mask_iou"]}
