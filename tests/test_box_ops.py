"""torchvision.ops against the box formulas this project used before (written out here: they are the
specification), on random and degenerate boxes. Every replacement is bit-identical, NaN where the formula
divides 0 by 0."""
import pytest
import torch
from torchvision import ops

from models.head_losses import paired_generalized_box_iou

EXACT = dict(rtol=0, atol=0, equal_nan=True)


def reference_cxcywh_to_xyxy(x):
    """(cx, cy, w, h) [..., 4] -> (x0, y0, x1, y1) [..., 4]."""
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def reference_iou_union(boxes1, boxes2):
    """Pairwise IoU and union of xyxy boxes [N, 4], [M, 4] -> ([N, M], [N, M])."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2 - inter
    return inter / union, union


def reference_giou(boxes1, boxes2):
    """Pairwise GIoU of xyxy boxes [N, 4], [M, 4] -> [N, M] (the old inverted-box check left out on purpose)."""
    iou, union = reference_iou_union(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull


def random_xyxy(n, generator=None):
    """n valid xyxy boxes [n, 4] inside the unit square."""
    corners = torch.rand(n, 2, 2, generator=generator)
    lo, hi = corners.min(dim=1).values, corners.max(dim=1).values
    return torch.cat([lo, hi], dim=1)


def degenerate_xyxy():
    """[8, 4]: zero width, zero height, a point, the unit square, a box inside it, one touching it, one
    disjoint from it, the unit square again."""
    return torch.tensor([[0.2, 0.1, 0.2, 0.6], [0.1, 0.3, 0.7, 0.3], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0],
                         [0.25, 0.25, 0.5, 0.75], [1.0, 0.0, 1.5, 1.0], [2.0, 2.0, 3.0, 2.5], [0.0, 0.0, 1.0, 1.0]])


@pytest.fixture
def boxes():
    """[48, 4] xyxy: 40 random boxes, then the degenerate ones."""
    return torch.cat([random_xyxy(40, torch.Generator().manual_seed(1)), degenerate_xyxy()])


def test_box_convert_equals_the_formula(boxes):
    cxcywh = ops.box_convert(boxes, "xyxy", "cxcywh")
    torch.testing.assert_close(ops.box_convert(cxcywh, "cxcywh", "xyxy"), reference_cxcywh_to_xyxy(cxcywh), **EXACT)
    # leading dimensions are kept (utils/visualize.py converts [..., 4])
    torch.testing.assert_close(ops.box_convert(cxcywh.view(2, 3, 8, 4), "cxcywh", "xyxy"),
                               reference_cxcywh_to_xyxy(cxcywh).view(2, 3, 8, 4), **EXACT)


def test_pairwise_iou_and_giou_equal_the_formulas(boxes):
    other = boxes.flip(0)
    torch.testing.assert_close(ops.box_iou(boxes, other), reference_iou_union(boxes, other)[0], **EXACT)
    torch.testing.assert_close(ops.generalized_box_iou(boxes, other), reference_giou(boxes, other), **EXACT)
    # 0 / 0 only where both boxes have zero area and do not overlap
    assert ops.box_iou(boxes, other).isnan().any()


def test_paired_iou_and_giou_equal_the_pairwise_diagonal(boxes):
    """Sets of one box ([N, 1, 4]) give the paired values that utils/engine.py and the loss use."""
    other = boxes.roll(1, 0)
    paired_iou = ops.box_iou(boxes[:, None], other[:, None])[:, 0, 0]
    torch.testing.assert_close(paired_iou, reference_iou_union(boxes, other)[0].diagonal(), **EXACT)
    torch.testing.assert_close(paired_generalized_box_iou(boxes, other), reference_giou(boxes, other).diagonal(),
                               **EXACT)
    assert paired_generalized_box_iou(boxes, other).shape == (48,)


def test_iou_giou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 0.0, 5.0, 1.0]])
    # overlap 1, union 4 + 4 - 1 = 7; identical boxes; disjoint boxes
    torch.testing.assert_close(ops.box_iou(a, b), torch.tensor([[1 / 7, 1.0, 0.0]]))
    # hulls: 3x3 = 9, 2x2 = 4, 5x2 = 10; unions 7, 4, 5
    expected_giou = torch.tensor([1 / 7 - (9 - 7) / 9, 1.0, 0.0 - (10 - 5) / 10])
    torch.testing.assert_close(paired_generalized_box_iou(a.expand(3, 4), b), expected_giou)


def test_giou_range_and_symmetry():
    g = torch.Generator().manual_seed(3)
    boxes1, boxes2 = random_xyxy(40, g), random_xyxy(40, g)
    giou = paired_generalized_box_iou(boxes1, boxes2)
    assert ((giou >= -1) & (giou <= 1)).all()
    assert (giou <= ops.box_iou(boxes1[:, None], boxes2[:, None])[:, 0, 0] + 1e-7).all()
    torch.testing.assert_close(giou, paired_generalized_box_iou(boxes2, boxes1))


def test_paired_giou_gradient_is_finite():
    pred = torch.tensor([[0.5, 0.5, 0.3, 0.2], [0.2, 0.3, 0.1, 0.4]], requires_grad=True)
    target = torch.tensor([[0.4, 0.6, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    giou = paired_generalized_box_iou(ops.box_convert(pred, "cxcywh", "xyxy"),
                                      ops.box_convert(target, "cxcywh", "xyxy"))
    (1 - giou).sum().backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_inverted_and_nan_boxes_give_values_not_exceptions():
    """No host-side validity check: a diverged prediction shows up as a non-finite loss in the trainer."""
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 0.4, 0.4]])
    bad = torch.tensor([[float("nan")] * 4, [0.5, 0.2, 0.4, 0.4]])  # NaN; x1 < x0
    giou = paired_generalized_box_iou(bad, good)
    assert giou[0].isnan()
    torch.testing.assert_close(giou, reference_giou(bad, good).diagonal(), **EXACT)
