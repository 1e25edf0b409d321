"""A head is one HeadSpec: a toy head declared in this file alone trains, logs its loss and reports its metric
through train_hivg.py and eval.py, with no edit of the library; the registry refuses clashes."""
import argparse
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train_hivg
from datasets import Collate, build_dataset
from datasets.tokens import tokenize
from eval import data_args
from eval import main as eval_main
from models.heads import HEADS, HeadSpec, LossTerm, register_head, unregister_head
from models.flags import add_model_args
from models.hivg import build_model
from models.weights import load_model
from tests.conftest import flags
from utils.losses import GroundingCriterion, build_criterion

BUILT_IN = ("box", "contrastive", "token_map", "seg_map")


def box_area(targets):
    """[B] area w * h of the normalised target boxes [B, 4] (cx, cy, w, h)."""
    return targets["boxes"][:, 2] * targets["boxes"][:, 3]


AREA = HeadSpec(
    name="area", outputs=("pred_area",), module="area_head", build=lambda dims: nn.Linear(dims.width, 1),
    compute=lambda head, feats: {"pred_area": head(feats.reg)[:, 0].sigmoid()},
    loss=lambda outputs, targets: {"loss_area": F.l1_loss(outputs["pred_area"], box_area(targets))},
    loss_terms=(LossTerm("loss_area", 3.0),), targets=("boxes",), flag="use_area_loss",
    flag_help="L1 loss of the predicted box area",
    metric=lambda outputs, targets: {"area_abs_error": (outputs["pred_area"] - box_area(targets)).abs()})


@pytest.fixture
def area_head():
    register_head(AREA)
    yield AREA
    unregister_head(AREA.name)


def model_flags(*extra):
    return add_model_args(argparse.ArgumentParser()).parse_args(
        ["--model", "tiny", "--imsize", "64", "--vl_dim_feedforward", "64", *extra])


def test_built_in_heads_keep_their_order_and_flags():
    assert tuple(HEADS)[:4] == BUILT_IN
    assert [HEADS[n].flag for n in BUILT_IN] == ["", "use_contrastive_loss", "use_rtcc_constrain_loss",
                                                 "use_mask_loss"]
    assert [HEADS[n].module for n in BUILT_IN] == ["box_head", "", "token_align", "seg_head"]


def test_a_registered_head_gets_a_flag_a_module_an_output_and_a_loss(area_head):
    args = model_flags("--use_area_loss")
    model = build_model(args).eval()
    assert model.config.outputs == ["box", "area"] and model.outputs == ("box", "area")
    assert {k for k in model.state_dict() if k.startswith("area_head.")} == {"area_head.weight", "area_head.bias"}
    images, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.int32)
    ids = tokenize(["a red circle", "the square on the left"], model.context_length)
    out = model(images, mask, ids)
    assert set(out) == {"pred_box", "pred_area"} and out["pred_area"].shape == (2,)
    criterion = build_criterion(args)
    assert criterion.heads == ("box", "area") and criterion.targets == ("boxes",)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.5], [0.4, 0.4, 0.4, 0.4]])
    losses = criterion(out, {"boxes": boxes})
    assert list(losses) == ["loss_bbox", "loss_giou", "loss_area"]
    expected = 3.0 * (out["pred_area"] - torch.tensor([0.1, 0.16])).abs().mean()
    torch.testing.assert_close(losses["loss_area"], expected)


def test_a_head_whose_flag_is_off_is_built_frozen_and_not_computed(area_head):
    model = build_model(model_flags())
    model.freeze_heads_without_loss()
    assert model.outputs == ("box",)
    assert not any(p.requires_grad for p in model.area_head.parameters())
    assert all(p.requires_grad for p in model.box_head.parameters())
    assert GroundingCriterion(heads=model.outputs).heads == ("box",)


def test_the_registry_is_left_as_found_after_unregistering():
    register_head(AREA)
    assert "--use_area_loss" in add_model_args(argparse.ArgumentParser()).format_help()
    unregister_head(AREA.name)
    assert tuple(HEADS) == BUILT_IN
    assert "--use_area_loss" not in add_model_args(argparse.ArgumentParser()).format_help()
    assert not any(k.startswith("area_head.") for k in build_model(model_flags()).state_dict())


@pytest.mark.parametrize("change, what", [
    ({"name": "seg_map"}, "name"), ({"name": "reg_attention"}, "name"), ({"outputs": ("token_map",)}, "output"),
    ({"loss_terms": (LossTerm("loss_giou", 1.0),)}, "loss term"), ({"flag": "use_mask_loss"}, "flag"),
    ({"module": "box_head"}, "module"), ({"build": None}, "give both `module` and `build`"),
])
def test_a_clash_with_a_registered_head_is_refused(change, what):
    with pytest.raises(ValueError, match=f"head '{change.get('name', 'area')}': {what}"):
        register_head(dataclasses.replace(AREA, **change))
    assert tuple(HEADS) == BUILT_IN


def test_toy_head_trains_logs_and_reports_its_metric_through_the_scripts(area_head, data, tmp_path,
                                                                         capsys):
    out = tmp_path / "run"
    run = flags(data, out, "--use_area_loss", "--epochs", "1", "--epoch_samples", "8")
    assert train_hivg.main(run) == 0
    [record] = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert record["train_loss_area"] > 0 and 0 <= record["val_area_abs_error"] <= 1
    assert list(record)[1:9] == ["train_loss_bbox", "train_loss_giou", "train_loss_align_focal",
                                 "train_loss_align_dice", "train_loss_seg_focal", "train_loss_seg_dice",
                                 "train_loss_area", "train_loss"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert {"train/loss_area", "val/area_abs_error"} <= set(events.Tags()["scalars"])

    assert eval_main(["--eval_model", str(out / "checkpoint.pth"), "--eval_set", "test", "--batch_size", "4",
                      "--num_workers", "0", "--device", "cpu"]) == 0
    metrics = json.loads((out / "eval_checkpoint.json").read_text())["synthref"]["test"]["metrics"]
    assert {name for name in metrics if not name.startswith(("mask_", "box_mask_"))} == {"area_abs_error"}
    assert f"test area_abs_error: {metrics['area_abs_error']:.4f}" in capsys.readouterr().out
    # the same mean, computed here in one batch
    model = load_model(out / "checkpoint.pth")
    opts = argparse.Namespace(data_root=str(data), split_root=str(data), allow_unsafe_pickle=False,
                              allow_outside_paths=False)
    test_set = build_dataset("test", data_args(opts, {}, model.image_size, dataset="synthref"))
    batch = Collate(model.context_length)([test_set[i] for i in range(len(test_set))])
    with torch.no_grad():
        pred = model(batch.images, batch.pixel_mask, batch.ids, outputs=["area"])["pred_area"]
    expected = (pred - box_area({"boxes": batch.boxes})).abs().mean().item()
    assert metrics["area_abs_error"] == pytest.approx(expected, rel=1e-5)
