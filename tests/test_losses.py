import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import FIXTURES
from utils.losses import (
    LOSS_WEIGHTS,
    OFFICIAL_LOSS_NAMES,
    clip_loss,
    dice_loss,
    grounding_losses,
    sigmoid_focal_loss,
)

FIXTURE = FIXTURES / "hivg_tiny_unc_stage1"
ALL_TERMS = set(LOSS_WEIGHTS)


def load(name):
    return torch.load(FIXTURE / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def inputs():
    return load("inputs.pth")


@pytest.fixture(scope="module")
def outputs():
    return load("outputs.pth")


def fixture_losses(inputs, run):
    return grounding_losses(run["pred_box"], inputs["gt_box_cxcywh"], inputs["obj_mask"],
                            logits_per_text=run["logits_per_text"],
                            token_map=run["visu_token_similarity"],
                            seg_map=run["seg_mask"])


@pytest.mark.parametrize("run_name", ["bool_mask", "collate_int32_mask"])
def test_matches_official_fixture(inputs, outputs, run_name):
    run = outputs if run_name == "bool_mask" else outputs["collate_int32_mask"]
    losses = fixture_losses(inputs, run)
    expected = {OFFICIAL_LOSS_NAMES[name]: value for name, value in run["losses"].items()}
    assert set(losses) == set(expected) == ALL_TERMS
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(sum(losses.values()), run["loss_total"], rtol=1e-5, atol=1e-5)


def test_obj_mask_layouts_agree(inputs, outputs):
    squeezed = dict(inputs, obj_mask=inputs["obj_mask"].squeeze(1).bool())
    a, b = fixture_losses(inputs, outputs), fixture_losses(squeezed, outputs)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_official_names_cover_every_term():
    assert set(OFFICIAL_LOSS_NAMES.values()) == ALL_TERMS
    assert OFFICIAL_LOSS_NAMES["loss_algin_focal"] == "loss_align_focal"


def test_optional_heads_add_only_their_terms(inputs, outputs):
    pred, gt, mask = outputs["pred_box"], inputs["gt_box_cxcywh"], inputs["obj_mask"]
    assert set(grounding_losses(pred, gt, mask)) == {"loss_bbox", "loss_giou"}
    with_text = grounding_losses(pred, gt, mask, logits_per_text=outputs["logits_per_text"])
    assert set(with_text) == {"loss_bbox", "loss_giou", "loss_contrastive"}
    with_tokens = grounding_losses(pred, gt, mask, token_map=outputs["visu_token_similarity"])
    assert set(with_tokens) == {"loss_bbox", "loss_giou", "loss_align_focal", "loss_align_dice"}
    with_seg = grounding_losses(pred, gt, mask, seg_map=outputs["seg_mask"])
    assert set(with_seg) == {"loss_bbox", "loss_giou", "loss_seg_focal", "loss_seg_dice"}


def test_gradients_are_finite(inputs, outputs):
    leaves = {name: outputs[name].clone().requires_grad_(True)
              for name in ("pred_box", "logits_per_text", "visu_token_similarity", "seg_mask")}
    total = sum(fixture_losses(inputs, leaves).values())
    total.backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), name
        assert leaf.grad.abs().sum() > 0, name


def test_box_terms_hand_values():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4]])
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.4]])
    losses = grounding_losses(pred, gt, torch.zeros(2, 8, 8))
    # L1: only |0.4 - 0.2| in sample 1 -> 0.2 / 2 * 2
    torch.testing.assert_close(losses["loss_bbox"], torch.tensor(0.2))
    # GIoU: sample 0 identical (0); sample 1 gt inside pred, IoU 0.5, hull = union -> 1 - 0.5
    torch.testing.assert_close(losses["loss_giou"], torch.tensor(0.5))


def test_focal_and_dice_hand_values():
    logits = torch.tensor([[0.0, 0.0], [2.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # p = 0.5 everywhere in sample 0: ce = log 2, (1 - p_t)^2 = 1/4, alpha_t 0.25 / 0.75
    sample0 = (0.25 + 0.75) * math.log(2) / 4 / 2
    p = torch.sigmoid(torch.tensor([2.0, -1.0]))
    ce = -torch.log(p)
    sample1 = (0.25 * ce * (1 - p) ** 2).mean()
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, 2), (sample0 + sample1) / 2)

    probs = torch.sigmoid(logits)
    dice = 1 - (2 * (probs * targets).sum(1) + 1) / (probs.sum(1) + targets.sum(1) + 1)
    torch.testing.assert_close(dice_loss(logits, targets, 2), dice.sum() / 2)


def test_focal_without_alpha_and_gamma_zero_is_bce():
    logits, targets = torch.randn(3, 5), (torch.rand(3, 5) > 0.5).float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / 3
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, 3, alpha=-1, gamma=0), bce)


def test_clip_loss_is_symmetric_cross_entropy():
    logits = torch.randn(4, 4)
    labels = torch.arange(4)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    torch.testing.assert_close(clip_loss(logits), expected)
    torch.testing.assert_close(clip_loss(logits.t()), expected)


def test_token_map_must_be_square(inputs, outputs):
    with pytest.raises(ValueError, match="square patch grid"):
        grounding_losses(outputs["pred_box"], inputs["gt_box_cxcywh"], inputs["obj_mask"],
                         token_map=torch.zeros(3, 15))


def test_bad_mask_shapes_raise(inputs, outputs):
    with pytest.raises(ValueError, match="obj_mask"):
        grounding_losses(outputs["pred_box"], inputs["gt_box_cxcywh"], torch.zeros(3, 2, 8, 8))
    with pytest.raises(ValueError, match="seg_map"):
        grounding_losses(outputs["pred_box"], inputs["gt_box_cxcywh"], inputs["obj_mask"],
                         seg_map=torch.zeros(3, 32, 32))
