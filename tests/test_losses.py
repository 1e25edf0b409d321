import argparse
import math
import re

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import FIXTURES
from models.head_losses import clip_loss, dice_loss, focal_loss
from models.heads import official_loss_names
from utils.losses import GroundingCriterion, build_criterion

FIXTURE_DIRS = sorted(FIXTURES.glob("hivg_*"))  # the authors' fixtures (utils/parity.py)
FIXTURE = FIXTURES / "hivg_tiny_unc_stage1"
AUX_HEADS = ("contrastive", "token_map", "seg_map")  # the authors' three auxiliary losses
# the official weights (the authors' trans_vg_loss)
LOSS_WEIGHTS = {"loss_bbox": 2.0, "loss_giou": 2.0, "loss_contrastive": 1.0, "loss_align_focal": 20.0,
                "loss_align_dice": 2.0, "loss_seg_focal": 20.0, "loss_seg_dice": 2.0}
ALL_TERMS = set(LOSS_WEIGHTS)
OFFICIAL_LOSS_NAMES = official_loss_names()
BOX_TERMS = {"loss_bbox", "loss_giou"}
# official output name -> ours
OUTPUT_NAMES = {"pred_box": "pred_box", "logits_per_text": "logits_per_text", "visu_token_similarity": "token_map",
                "seg_mask": "seg_map"}


def load(folder, name):
    return torch.load(folder / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def inputs():
    return load(FIXTURE, "inputs.pth")


@pytest.fixture(scope="module")
def outputs():
    return load(FIXTURE, "outputs.pth")


def model_outputs(run):
    """Official output dict -> ours (the criterion's input)."""
    return {ours: run[off] for off, ours in OUTPUT_NAMES.items()}


def targets(inputs, obj_mask=None):
    return {"boxes": inputs["gt_box_cxcywh"], "obj_masks": inputs["obj_mask"] if obj_mask is None else obj_mask}


def full_criterion():
    return GroundingCriterion(heads=AUX_HEADS)


@pytest.mark.recorded
@pytest.mark.parametrize("run_name", ["bool_mask", "collate_int32_mask"])
@pytest.mark.parametrize("folder", FIXTURE_DIRS, ids=lambda p: p.name)
def test_matches_official_fixture(folder, run_name):
    outputs = load(folder, "outputs.pth")
    run = outputs if run_name == "bool_mask" else outputs["collate_int32_mask"]
    losses = full_criterion()(model_outputs(run), targets(load(folder, "inputs.pth")))
    expected = {OFFICIAL_LOSS_NAMES[name]: value for name, value in run["losses"].items()}
    assert set(losses) == set(expected) == ALL_TERMS
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(sum(losses.values()), run["loss_total"], rtol=1e-5, atol=1e-5)


def test_fixtures_are_found():
    assert len(FIXTURE_DIRS) == 4


def test_obj_mask_layouts_agree(inputs, outputs):
    squeezed = inputs["obj_mask"].squeeze(1).bool()
    criterion = full_criterion()
    a = criterion(model_outputs(outputs), targets(inputs))
    b = criterion(model_outputs(outputs), targets(inputs, squeezed))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_official_names_cover_every_term():
    assert set(OFFICIAL_LOSS_NAMES.values()) == ALL_TERMS
    assert len(OFFICIAL_LOSS_NAMES) == len(ALL_TERMS)
    assert OFFICIAL_LOSS_NAMES["loss_algin_focal"] == "loss_align_focal"


def test_declared_weights_are_the_official_ones():
    weights = full_criterion().weights
    assert weights == LOSS_WEIGHTS and list(weights) == list(LOSS_WEIGHTS)


@pytest.mark.parametrize("heads, terms", [
    ((), set()),
    (("contrastive",), {"loss_contrastive"}),
    (("token_map",), {"loss_align_focal", "loss_align_dice"}),
    (("seg_map",), {"loss_seg_focal", "loss_seg_dice"}),
])
def test_criterion_computes_exactly_its_terms(inputs, outputs, heads, terms):
    """Model outputs no term reads (here all four heads) are ignored."""
    losses = GroundingCriterion(heads=heads)(model_outputs(outputs), targets(inputs))
    assert set(losses) == BOX_TERMS | terms


def test_terms_come_in_the_authors_order(inputs, outputs):
    """The order of the sum (and of the logged terms) is the authors': box, contrastive, alignment, segmentation."""
    losses = GroundingCriterion(heads=AUX_HEADS[::-1])(model_outputs(outputs), targets(inputs))
    assert list(losses) == list(LOSS_WEIGHTS)


def test_build_criterion_reads_the_three_flags():
    flags = dict(use_contrastive_loss=False, use_rtcc_constrain_loss=True, use_mask_loss=True)
    assert build_criterion(argparse.Namespace(**flags)).heads == ("box", "token_map", "seg_map")
    assert build_criterion(argparse.Namespace(use_contrastive_loss=True)).heads == ("box", "contrastive")
    assert build_criterion(argparse.Namespace()).heads == ("box",)
    assert build_criterion(argparse.Namespace(**flags)).targets == ("boxes", "obj_masks")
    assert build_criterion(argparse.Namespace()).targets == ("boxes",)


def test_missing_output_raises_naming_it(inputs, outputs):
    without_tokens = {k: v for k, v in model_outputs(outputs).items() if k != "token_map"}
    criterion = GroundingCriterion(heads=("token_map",))
    message = "no 'token_map' (for the token_map loss, --use_rtcc_constrain_loss)"
    with pytest.raises(ValueError, match=re.escape(message)):
        criterion(without_tokens, targets(inputs))


def test_unknown_terms_and_weights_raise():
    with pytest.raises(ValueError, match="unknown heads \\['mask'\\]"):
        GroundingCriterion(heads=("mask",))
    with pytest.raises(ValueError, match="unknown loss weights \\['loss_l1'\\]"):
        GroundingCriterion(weights={"loss_l1": 1.0})


def test_weights_scale_their_term_only(inputs, outputs):
    base = full_criterion()(model_outputs(outputs), targets(inputs))
    heavier = GroundingCriterion(AUX_HEADS, weights={"loss_giou": 5.0})(model_outputs(outputs), targets(inputs))
    torch.testing.assert_close(heavier["loss_giou"], base["loss_giou"] * 5.0 / LOSS_WEIGHTS["loss_giou"])
    for name in ALL_TERMS - {"loss_giou"}:
        torch.testing.assert_close(heavier[name], base[name], rtol=0, atol=0)


def test_bf16_outputs_are_cast_to_float32(inputs, outputs):
    bf16 = {k: v.bfloat16() for k, v in model_outputs(outputs).items()}
    criterion = full_criterion()
    losses = criterion(bf16, targets(inputs))
    expected = criterion({k: v.float() for k, v in bf16.items()}, targets(inputs))
    for name, value in losses.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def test_nan_boxes_give_a_non_finite_loss_not_an_exception(inputs, outputs):
    diverged = dict(model_outputs(outputs), pred_box=torch.full((3, 4), float("nan")))
    losses = full_criterion()(diverged, targets(inputs))
    assert not torch.isfinite(losses["loss_bbox"]) and not torch.isfinite(losses["loss_giou"])
    assert not torch.isfinite(sum(losses.values()))


def test_no_value_is_read_on_the_host():
    """Meta tensors have shapes but no values: any .item(), Python `if` on a tensor or boolean-mask
    indexing (each a device -> host sync on CUDA) would raise here."""
    meta = dict(device="meta")
    out = {"pred_box": torch.rand(3, 4, **meta), "logits_per_text": torch.rand(3, 3, **meta),
           "token_map": torch.rand(3, 16, **meta), "seg_map": torch.rand(3, 1, 8, 8, **meta)}
    tgt = {"boxes": torch.rand(3, 4, **meta), "obj_masks": torch.zeros(3, 32, 32, dtype=torch.bool, **meta)}
    losses = full_criterion()(out, tgt)
    assert set(losses) == ALL_TERMS and all(v.shape == () for v in losses.values())


def test_gradients_are_finite(inputs, outputs):
    leaves = {name: value.clone().requires_grad_(True) for name, value in model_outputs(outputs).items()}
    total = sum(full_criterion()(leaves, targets(inputs)).values())
    total.backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), name
        assert leaf.grad.abs().sum() > 0, name


def test_box_terms_hand_values():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4]])
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.4]])
    losses = GroundingCriterion()({"pred_box": pred}, {"boxes": gt, "obj_masks": torch.zeros(2, 8, 8)})
    # L1: only |0.4 - 0.2| in sample 1 -> 0.2 / 2 * 2
    torch.testing.assert_close(losses["loss_bbox"], torch.tensor(0.2))
    # GIoU: sample 0 identical (0); sample 1 gt inside pred, IoU 0.5, hull = union -> 1 - 0.5
    torch.testing.assert_close(losses["loss_giou"], torch.tensor(0.5))


def reference_focal(logits, targets, num_boxes, alpha=0.25, gamma=2):
    """The focal loss this project used before torchvision's (the specification)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * (ce * ((1 - p_t) ** gamma))
    return loss.mean(1).sum() / num_boxes


def test_focal_equals_the_formula():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 300, generator=g) * 6
    targets = (torch.rand(5, 300, generator=g) > 0.7).float()
    torch.testing.assert_close(focal_loss(logits, targets, 5), reference_focal(logits, targets, 5), rtol=0, atol=0)


def test_focal_and_dice_hand_values():
    logits = torch.tensor([[0.0, 0.0], [2.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # p = 0.5 everywhere in sample 0: ce = log 2, (1 - p_t)^2 = 1/4, alpha_t 0.25 / 0.75
    sample0 = (0.25 + 0.75) * math.log(2) / 4 / 2
    p = torch.sigmoid(torch.tensor([2.0, -1.0]))
    ce = -torch.log(p)
    sample1 = (0.25 * ce * (1 - p) ** 2).mean()
    torch.testing.assert_close(focal_loss(logits, targets, 2), (sample0 + sample1) / 2)

    probs = torch.sigmoid(logits)
    dice = 1 - (2 * (probs * targets).sum(1) + 1) / (probs.sum(1) + targets.sum(1) + 1)
    torch.testing.assert_close(dice_loss(logits, targets, 2), dice.sum() / 2)


def test_clip_loss_is_symmetric_cross_entropy():
    logits = torch.randn(4, 4)
    labels = torch.arange(4)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    torch.testing.assert_close(clip_loss(logits), expected)
    torch.testing.assert_close(clip_loss(logits.t()), expected)


def test_token_map_must_be_square(inputs, outputs):
    bad = dict(model_outputs(outputs), token_map=torch.zeros(3, 15))
    with pytest.raises(ValueError, match="square patch grid"):
        GroundingCriterion(heads=("token_map",))(bad, targets(inputs))


def test_bad_mask_shapes_raise(inputs, outputs):
    with pytest.raises(ValueError, match="obj_mask"):
        GroundingCriterion(heads=("seg_map",))(model_outputs(outputs), targets(inputs, torch.zeros(3, 2, 8, 8)))
    bad = dict(model_outputs(outputs), seg_map=torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="seg_map"):
        GroundingCriterion(heads=("seg_map",))(bad, targets(inputs))
