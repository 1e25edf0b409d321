"""Bounding-box utilities: format conversion, IoU and generalized IoU.

Boxes are float tensors whose last dimension holds four coordinates, either
(cx, cy, w, h) or (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1. Pairwise
functions return an [N, M] matrix; the ``paired_*`` functions compare box i of
the first set with box i of the second and return [N], which is all the
grounding loss needs (one prediction per target).
"""
import torch
from torch import Tensor


def box_cxcywh_to_xyxy(x: Tensor) -> Tensor:
    """(cx, cy, w, h) [..., 4] -> (x0, y0, x1, y1) [..., 4]."""
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(x: Tensor) -> Tensor:
    """(x0, y0, x1, y1) [..., 4] -> (cx, cy, w, h) [..., 4]."""
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes [N, 4] -> [N]."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _check_xyxy(boxes: Tensor, name: str) -> None:
    """Raise ValueError if any box of ``boxes`` [N, 4] has x1 < x0 or y1 < y0 (or is NaN)."""
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected boxes of shape [N, 4], got {tuple(boxes.shape)}")
    valid = (boxes[:, 2:] >= boxes[:, :2]).all(dim=1)
    if not bool(valid.all()):
        index = int((~valid).nonzero()[0, 0])
        raise ValueError(
            f"{name}: box {index} = {boxes[index].tolist()} is not a valid (x0, y0, x1, y1) box "
            "(needs x1 >= x0 and y1 >= y0); convert (cx, cy, w, h) boxes with box_cxcywh_to_xyxy first"
        )


def _check_paired(boxes1: Tensor, boxes2: Tensor) -> None:
    """Raise ValueError unless both sets are [N, 4] with the same N."""
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"paired boxes need equal shapes [N, 4], got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes.

    Args:
        boxes1: [N, 4] xyxy.
        boxes2: [M, 4] xyxy.
    Returns:
        (iou [N, M], union [N, M]).
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])  # [N, M, 2]
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])  # [N, M, 2]
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2 - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (https://giou.stanford.edu/) of xyxy boxes.

    Args:
        boxes1: [N, 4] xyxy.
        boxes2: [M, 4] xyxy.
    Returns:
        giou [N, M], in [-1, 1].
    Raises:
        ValueError: if a box is inverted (x1 < x0 or y1 < y0); such boxes give inf/nan.
    """
    _check_xyxy(boxes1, "boxes1")
    _check_xyxy(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])  # [N, M, 2]
    rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull


def _paired_iou_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and union of box i of boxes1 [N, 4] with box i of boxes2 [N, 4] -> ([N], [N])."""
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])  # [N, 2]
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter / union, union


def paired_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of matching rows: boxes1 [N, 4] xyxy, boxes2 [N, 4] xyxy -> [N].

    Equals ``box_iou(boxes1, boxes2)[0].diagonal()`` without building the [N, N] matrix.
    """
    _check_paired(boxes1, boxes2)
    return _paired_iou_union(boxes1, boxes2)[0]


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU of matching rows: boxes1 [N, 4] xyxy, boxes2 [N, 4] xyxy -> [N].

    Equals ``generalized_box_iou(boxes1, boxes2).diagonal()`` without the [N, N] matrix.
    Raises ValueError for inverted boxes, like generalized_box_iou.
    """
    _check_paired(boxes1, boxes2)
    _check_xyxy(boxes1, "boxes1")
    _check_xyxy(boxes2, "boxes2")
    iou, union = _paired_iou_union(boxes1, boxes2)
    lt = torch.min(boxes1[:, :2], boxes2[:, :2])  # [N, 2]
    rb = torch.max(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[:, 0] * wh[:, 1]
    return iou - (hull - union) / hull
