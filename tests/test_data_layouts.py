"""Hand-made split files in every official layout: parsing, image folders, boxes on the object."""
import random

import pytest
import torch

from datasets import Batch, Collate, build_dataset
from datasets.tokens import tokenize
from datasets.refer import DATASETS, load_refs
from tests.data_helpers import (TARGET_XYWH, args_for, assert_box_on_red, assert_mask_on_red, write_layout, xyxy)

OFFICIAL = ("unc", "unc+", "gref", "gref_umd", "referit", "flickr", "mixup")
AUGMENT = dict(aug_crop=True, aug_scale=True, aug_translate=True, aug_blur=True)


def test_official_splits():
    assert DATASETS["unc"].splits[:4] == ("train", "val", "testA", "testB")
    assert DATASETS["unc+"].splits[:4] == ("train", "val", "testA", "testB")
    assert DATASETS["gref"].splits[:2] == ("train", "val") and "test" not in DATASETS["gref"].splits
    for name in ("gref_umd", "referit", "flickr", "mixup", "synthref"):
        assert DATASETS[name].splits[:3] == ("train", "val", "test")


@pytest.mark.parametrize("dataset", OFFICIAL)
def test_layout_parsed(tmp_path, dataset):
    write_layout(tmp_path, dataset)
    refs = load_refs(str(tmp_path), dataset, "train")
    x0, y0 = int(TARGET_XYWH[0]), int(TARGET_XYWH[1])
    if dataset in ("referit", "flickr"):      # xyxy stored, each coordinate truncated
        expected = tuple(int(v) for v in xyxy(TARGET_XYWH))
    else:                                     # xywh stored: x1 = int(x) + int(w)
        expected = (x0, y0, x0 + int(TARGET_XYWH[2]), y0 + int(TARGET_XYWH[3]))
    assert all(r.box_xyxy == expected for r in refs)
    folders = {r.folder for r in refs}
    assert folders == ({"coco", "flickr", "referit"} if dataset == "mixup"
                       else {"referit"} if dataset == "referit" else {"flickr"} if dataset == "flickr" else {"coco"})
    trainval = load_refs(str(tmp_path), dataset, "trainval") if dataset != "referit" else None
    if trainval is not None:
        assert len(trainval) == 2 * len(refs)


@pytest.mark.parametrize("dataset", OFFICIAL)
def test_boxes_land_on_object_after_every_transform(tmp_path, dataset):
    write_layout(tmp_path, dataset)
    train = build_dataset("train", args_for(dataset, tmp_path, aug_crop=True, aug_scale=True, aug_translate=True))
    blurred = build_dataset("train", args_for(dataset, tmp_path, **AUGMENT))
    val = build_dataset("val", args_for(dataset, tmp_path))
    random.seed(0)
    checked = sum(assert_box_on_red(train[i % len(train)]) for i in range(24))
    checked += sum(assert_box_on_red(blurred[i % len(train)], inner=2, outer=4) for i in range(12))
    assert checked >= 15
    for i in range(len(val)):
        record = val[i]
        assert assert_box_on_red(record)
        assert_mask_on_red(record)       # box mask = the red rectangle


@pytest.mark.parametrize("dataset", ("unc", "mixup"))
def test_polygon_masks_follow_the_image(tmp_path, dataset):
    write_layout(tmp_path, dataset, triangle=True)
    ds = build_dataset("train", args_for(dataset, tmp_path, use_seg_mask=True, **AUGMENT))
    random.seed(1)
    for i in range(12):
        record = ds[i % len(ds)]
        ref = ds.refs[i % len(ds)]
        if ref.folder == "coco":
            assert_mask_on_red(record)   # the triangle, not its box
            w, h = (record.box[2:] * record.image.shape[-1]).tolist()
            assert 0.3 * w * h < record.obj_mask.sum() < 0.7 * w * h


def test_collate_batch(tmp_path):
    write_layout(tmp_path, "unc")
    ds = build_dataset("val", args_for("unc", tmp_path, imsize=96))
    batch = Collate(16)([ds[i] for i in range(len(ds))])
    assert isinstance(batch, Batch)
    assert batch.images.shape == (3, 3, 96, 96) and batch.images.dtype == torch.float32
    assert batch.pixel_mask.shape == (3, 96, 96) and batch.pixel_mask.dtype == torch.int32
    assert batch.boxes.shape == (3, 4) and batch.boxes.dtype == torch.float32
    assert batch.obj_masks.shape == (3, 96, 96) and set(batch.obj_masks.unique().tolist()) <= {0.0, 1.0}
    assert batch.texts == ["the red box"] * 3
    assert batch.ids.shape == (3, 16) and torch.equal(batch.ids, tokenize(["the red box"] * 3, 16))
    moved = batch.to("cpu")
    assert torch.equal(moved.images, batch.images) and torch.equal(moved.ids, batch.ids) and moved.texts == batch.texts
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=Collate(), num_workers=0)
    assert [b.images.shape[0] for b in loader] == [2, 1]
