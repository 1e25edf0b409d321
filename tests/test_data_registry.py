"""The dataset table: a format registered from outside the library is read end to end; unknown names are refused."""
import argparse
import os

import pytest
import torch

from datasets import DATASETS, DatasetSpec, build_dataset
from datasets.formats.fields import Ref, Where, box4, boxes_from_xyxy, check_strings
from datasets.registry import IMAGE_DIRS, dataset_spec
from datasets.verify import main as verify
from models.config import select_text_layers
from tests.data_helpers import TARGET_XYWH, args_for, assert_box_on_red, draw_scene, xyxy

CHOICES = "choose one of unc, unc\\+, gref, gref_umd, referit, flickr, mixup, synthref, jsonl"


def parse_toy(entry, where: Where) -> Ref:
    """A layout of this test's own: {'file', 'xyxy', 'text'} dicts."""
    check_strings(entry["file"], entry["text"], where)
    box_xyxy, box_xywh = boxes_from_xyxy(box4(entry["xyxy"], where))
    return Ref(image=entry["file"], folder=where.folder, box_xyxy=box_xyxy, box_xywh=box_xywh, phrase=entry["text"],
               size_hw=None, polygons=None, source=where.source, entry=where.index)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """Registers dataset 'toy' (images in toy/pictures) and writes its train and val splits under tmp_path."""
    monkeypatch.setitem(IMAGE_DIRS, "toy", os.path.join("toy", "pictures"))
    monkeypatch.setitem(DATASETS, "toy", DatasetSpec(parser=parse_toy, folder="toy", splits=("train", "val"),
                                                     text_layers="all"))
    os.makedirs(tmp_path / "toy")
    for split in ("train", "val"):
        names = [f"{split}{i}.png" for i in range(2)]
        for name in names:
            draw_scene(str(tmp_path / "toy" / "pictures" / name))
        torch.save([{"file": name, "xyxy": xyxy(TARGET_XYWH), "text": "The red box"} for name in names],
                   tmp_path / "toy" / f"toy_{split}.pth")
    return tmp_path


def test_registered_format_is_read_by_the_whole_pipeline(toy, capsys):
    val = build_dataset("val", args_for("toy", toy))
    assert [r.image for r in val.refs] == ["val0.png", "val1.png"]
    assert val.refs[0].folder == "toy" and val.refs[0].box_xyxy == tuple(int(v) for v in xyxy(TARGET_XYWH))
    assert val[0].phrase == "the red box" and assert_box_on_red(val[0])
    assert select_text_layers("toy", 12) == list(range(12))
    assert verify(["--dataset", "toy", "--data_root", str(toy), "--split_root", str(toy)]) == 0
    assert "val: 2 samples, 2 images" in capsys.readouterr().out


def test_registered_format_names_the_entry_it_cannot_read(toy):
    torch.save([{"file": "val0.png", "xyxy": [1, 2, 3], "text": "x"}], toy / "toy" / "toy_val.pth")
    with pytest.raises(ValueError, match="toy_val.pth, entry 0: the box must be 4 finite numbers"):
        build_dataset("val", args_for("toy", toy))


def test_unknown_dataset_is_refused_naming_the_choices(tmp_path):
    with pytest.raises(ValueError, match=f"unknown dataset 'refcoco' \\(--dataset\\); {CHOICES}$"):
        select_text_layers("refcoco", 12)
    args = argparse.Namespace(dataset="refcoco", data_root=str(tmp_path), split_root=str(tmp_path))
    with pytest.raises(ValueError, match=f"unknown dataset 'refcoco' \\(--dataset\\); {CHOICES}$"):
        build_dataset("val", args)


def test_every_dataset_states_its_text_layers():
    assert {name: spec.text_layers for name, spec in DATASETS.items()} == {
        "unc": "last", "unc+": "middle_last", "gref": "all", "gref_umd": "all", "referit": "middle_last",
        "flickr": "last", "mixup": "last", "synthref": "last", "jsonl": "last"}
    assert dataset_spec("flickr") is DATASETS["flickr"]


@pytest.mark.parametrize("change, message", [
    (dict(text_layers="first"), "text_layers 'first': choose one of last, middle_last, all"),
    (dict(folder="nowhere"), "image folder 'nowhere' is not in datasets.registry.IMAGE_DIRS"),
])
def test_spec_is_checked_when_made(change, message):
    fields = dict(parser=parse_toy, folder="coco", splits=("train", "val"), text_layers="last")
    with pytest.raises(ValueError, match=message):
        DatasetSpec(**{**fields, **change})
