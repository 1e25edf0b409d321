"""The data pipeline against the authors' code: eval inputs from image files on disk and the random crop's
choice, compared with golden outputs of their unmodified loader (tests/fixtures/authors_*/README.md)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from datasets import build_dataset, build_transforms, transforms
from datasets.transforms import RandomSizeCrop, Record
from tests.conftest import FIXTURES
from tests.data_helpers import args_for

EVAL = FIXTURES / "authors_eval_pipeline"
CROP = FIXTURES / "authors_random_crop"
STRIDE = {224: 1, 640: 4}     # the golden images keep every STRIDE-th pixel


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(EVAL / "golden.npz"))


@pytest.mark.parametrize("imsize", sorted(STRIDE))
def test_eval_inputs_from_files_equal_the_authors(golden, imsize):
    """JPEG and PNG files (RGB / L / P, long side 300-1600, both orientations) through the dataset's eval
    path give the authors' image (to float16 rounding), padding mask, object mask and box."""
    dataset = build_dataset("test", args_for("referit", EVAL, imsize=imsize))
    s = STRIDE[imsize]
    for idx in range(len(dataset)):
        rec, key, name = dataset[idx], f"{imsize}_{idx}", dataset.refs[idx].image
        image = rec.image[:, ::s, ::s]
        np.testing.assert_array_equal(image.half().numpy(), golden[f"img_{key}"], err_msg=name)   # fp16 rounding
        np.testing.assert_array_equal(rec.pixel_mask.numpy(), golden[f"mask_{key}"], err_msg=name)
        np.testing.assert_array_equal(rec.obj_mask.numpy(), golden[f"obj_mask_{key}"], err_msg=name)
        np.testing.assert_array_equal(rec.box.numpy(), golden[f"box_{key}"], err_msg=name)


def test_training_with_fast_jpeg_draft_decodes_and_eval_never_does(monkeypatch):
    """--fast_jpeg asks the decoder for a draft in the training split only."""
    drafts = []
    monkeypatch.setattr(JpegImageFile, "draft", lambda self, mode, size: drafts.append(size))
    args = args_for("referit", EVAL, imsize=224, fast_jpeg=True)
    dataset = build_dataset("test", args)
    dataset[0]                                       # 1600 x 1067 JPEG
    assert drafts == []
    dataset.transform = build_transforms(args, train=True)
    dataset[0]
    assert drafts == [(224, 149)]


def test_random_crop_keeps_the_candidate_the_authors_keep(monkeypatch):
    """Every candidate region the authors' RandomSizeCrop drew, replayed through ours (its draws, in their
    order: width, height, top, left): the same one is kept and the box comes out the same."""
    cases = json.loads((CROP / "cases.json").read_text())
    crop = RandomSizeCrop(384, 600)
    for n, case in enumerate(cases):
        w, h = case["size_wh"]
        draws = [v for top, left, ch, cw in case["candidates"] for v in (cw, ch, top, left)]
        used = iter(draws)

        def replay(lo, hi):
            value = next(used, None)
            assert value is not None, f"case {n}: candidate {case['accepted']}, the one the authors' code keeps, " \
                                      "was rejected"
            return value
        monkeypatch.setattr(transforms.random, "randint", replay)
        rec = Record(image=Image.new("L", (w, h)), box=torch.tensor(case["box"]), phrase="x",
                     obj_mask=np.zeros((h, w), bool))
        out = crop(rec)
        tries = (len(draws) - len(list(used))) // 4
        kept = tries - 1 if list(out.image.size) != [w, h] or out.box.tolist() != case["box"] else None
        assert kept == case["accepted"], f"case {n}: kept candidate {kept}, the authors' code {case['accepted']}"
        assert list(out.image.size) == case["size_out"] and out.box.tolist() == case["box_out"], f"case {n}"
        assert out.obj_mask.shape == (case["size_out"][1], case["size_out"][0])


def test_box_crop_rule_keeps_a_crop_above_left_of_the_box():
    crop = RandomSizeCrop(384, 600, rule="box")
    box = torch.tensor([100.0, 50.0, 300.0, 400.0])
    assert crop.accepts(box, top=49, left=99) and not crop.accepts(box, top=50, left=10)
    official = RandomSizeCrop(384, 600)
    assert official.accepts(box, top=199, left=224) and not official.accepts(box, top=200, left=10)
    with pytest.raises(ValueError, match="crop rule"):
        RandomSizeCrop(384, 600, rule="centre")


def test_crop_rule_flag_reaches_the_training_crop():
    for rule in ("official", "box"):
        t = build_transforms(args_for("referit", EVAL, imsize=224, aug_crop=True, crop_rule=rule), train=True)
        assert t.transforms[0].second.transforms[1].rule == rule
