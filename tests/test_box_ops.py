import pytest
import torch
from torchvision import ops

from utils.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    paired_box_iou,
    paired_generalized_box_iou,
)


def random_xyxy(n, generator=None):
    """n valid xyxy boxes [n, 4] inside the unit square."""
    corners = torch.rand(n, 2, 2, generator=generator)
    lo, hi = corners.min(dim=1).values, corners.max(dim=1).values
    return torch.cat([lo, hi], dim=1)


def test_conversions_hand_values_and_round_trip():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2]])
    xyxy = torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.0, 0.8, 0.2, 1.0]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy)
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)
    boxes = random_xyxy(50)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(boxes)), boxes)


def test_conversions_match_torchvision_and_keep_leading_dims():
    boxes = random_xyxy(24)
    torch.testing.assert_close(box_xyxy_to_cxcywh(boxes), ops.box_convert(boxes, "xyxy", "cxcywh"))
    cxcywh = box_xyxy_to_cxcywh(boxes)
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), ops.box_convert(cxcywh, "cxcywh", "xyxy"))
    assert box_cxcywh_to_xyxy(cxcywh.view(2, 3, 4, 4)).shape == (2, 3, 4, 4)


def test_area_iou_giou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 0.0, 5.0, 1.0]])
    torch.testing.assert_close(box_area(b), torch.tensor([4.0, 4.0, 1.0]))
    iou, union = box_iou(a, b)
    # overlap 1, union 4 + 4 - 1 = 7; identical boxes; disjoint boxes
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 1.0, 0.0]]))
    torch.testing.assert_close(union, torch.tensor([[7.0, 4.0, 5.0]]))
    # hulls: 3x3 = 9, 2x2 = 4, 5x2 = 10
    expected_giou = torch.tensor([[1 / 7 - (9 - 7) / 9, 1.0, 0.0 - (10 - 5) / 10]])
    torch.testing.assert_close(generalized_box_iou(a, b), expected_giou)


def test_pairwise_matches_torchvision():
    g = torch.Generator().manual_seed(1)
    boxes1, boxes2 = random_xyxy(7, g), random_xyxy(5, g)
    iou, union = box_iou(boxes1, boxes2)
    assert iou.shape == union.shape == (7, 5)
    torch.testing.assert_close(iou, ops.box_iou(boxes1, boxes2))
    torch.testing.assert_close(generalized_box_iou(boxes1, boxes2), ops.generalized_box_iou(boxes1, boxes2))
    torch.testing.assert_close(box_area(boxes1), ops.box_area(boxes1))


def test_paired_equals_pairwise_diagonal():
    g = torch.Generator().manual_seed(2)
    boxes1, boxes2 = random_xyxy(9, g), random_xyxy(9, g)
    boxes2[0] = boxes1[0]  # identical pair
    assert paired_box_iou(boxes1, boxes2).shape == (9,)
    torch.testing.assert_close(paired_box_iou(boxes1, boxes2), box_iou(boxes1, boxes2)[0].diagonal(),
                               rtol=0, atol=0)
    torch.testing.assert_close(paired_generalized_box_iou(boxes1, boxes2),
                               generalized_box_iou(boxes1, boxes2).diagonal(), rtol=0, atol=0)
    assert paired_box_iou(boxes1, boxes2)[0] == 1.0


def test_giou_range_and_symmetry():
    g = torch.Generator().manual_seed(3)
    boxes1, boxes2 = random_xyxy(40, g), random_xyxy(40, g)
    giou = paired_generalized_box_iou(boxes1, boxes2)
    assert ((giou >= -1) & (giou <= 1)).all()
    assert (giou <= paired_box_iou(boxes1, boxes2) + 1e-7).all()
    torch.testing.assert_close(giou, paired_generalized_box_iou(boxes2, boxes1))


@pytest.mark.parametrize("giou", [generalized_box_iou, paired_generalized_box_iou])
def test_inverted_boxes_raise(giou):
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 0.4, 0.4]])
    bad = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.2, 0.4, 0.4]])  # x1 < x0 in box 1
    with pytest.raises(ValueError, match="boxes2: box 1"):
        giou(good, bad)
    with pytest.raises(ValueError, match="boxes1: box 1"):
        giou(bad, good)


def test_paired_shape_mismatch_raises():
    with pytest.raises(ValueError, match="equal shapes"):
        paired_box_iou(random_xyxy(3), random_xyxy(4))
    with pytest.raises(ValueError, match="equal shapes"):
        paired_generalized_box_iou(random_xyxy(3), random_xyxy(4))


def test_paired_giou_gradient_is_finite():
    pred = torch.tensor([[0.5, 0.5, 0.3, 0.2], [0.2, 0.3, 0.1, 0.4]], requires_grad=True)
    target = torch.tensor([[0.4, 0.6, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    loss = (1 - paired_generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))).sum()
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
