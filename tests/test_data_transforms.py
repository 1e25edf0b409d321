"""Transforms: exact geometry, padding masks, determinism, spatial words, --fast_jpeg draft decoding."""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datasets.masks import box_to_mask, polygons_to_mask
from datasets.transforms import (NormalizeAndPad, RandomResize, RandomSelect, RandomSizeCrop, Record,
                                 make_transforms, resize_image, resize_mask)
from tests.data_helpers import draw_scene, to_uint8


def coordinate_image(w, h):
    """RGB image whose pixel (x, y) holds (x % 256, y % 256, 16 (x // 256) + y // 256)."""
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x % 256, y % 256, 16 * (x // 256) + y // 256], -1).astype(np.uint8))


def decode_origin(img):
    """(x, y) encoded in the top-left pixel of a cropped coordinate image."""
    r, g, b = np.asarray(img)[0, 0].astype(int)
    return r + 256 * (b // 16), g + 256 * (b % 16)


def record(img, box, mask=None, phrase="the thing"):
    w, h = img.size
    mask = box_to_mask((box[0], box[1], box[2] - box[0], box[3] - box[1]), h, w) if mask is None else mask
    return Record(image=img, box=torch.tensor(box, dtype=torch.float32), phrase=phrase, obj_mask=mask)


def test_resize_long_side_formula():
    rec = RandomResize([224])(record(coordinate_image(300, 200), [30.0, 40.0, 90.0, 120.0]))
    ratio = 224 / 300
    assert rec.image.size == (224, round(200 * ratio))           # (w, h) = (224, 149)
    assert torch.allclose(rec.box, torch.tensor([30.0, 40.0, 90.0, 120.0]) * ratio)
    assert rec.obj_mask.shape == (149, 224)
    rec = RandomResize([400], long_side=False)(record(coordinate_image(300, 200), [0.0, 0.0, 10.0, 10.0]))
    assert rec.image.size == (600, 400)


def test_resize_mask_matches_torch_nearest():
    rng = np.random.default_rng(0)
    for h, w, nh, nw in ((480, 640, 168, 224), (97, 131, 224, 61), (50, 50, 600, 600), (333, 500, 149, 224)):
        m = rng.random((h, w)) > 0.5
        ref = F.interpolate(torch.from_numpy(m)[None, None].float(), size=(nh, nw), mode="nearest")[0, 0] > 0.5
        assert np.array_equal(resize_mask(m, (nh, nw)), ref.numpy())


def test_crop_moves_image_box_and_mask_together():
    img = coordinate_image(700, 520)
    box = [400.0, 60.0, 650.0, 300.0]
    crop = RandomSizeCrop(384, 600, rule="box")
    mask = np.asarray(img)[..., 0] % 7 == 0                   # a mask tied to image content
    cropped = 0
    for seed in range(30):
        random.seed(seed)
        rec = crop(record(img.copy(), list(box), mask=mask.copy()))
        if rec.image.size == img.size:
            continue
        cropped += 1
        left, top = decode_origin(rec.image)
        w, h = rec.image.size
        assert 384 <= w <= 600 and 384 <= h <= 600
        assert left < box[0] and top < box[1]                 # origin above-left of the box corner
        expected = torch.tensor([box[0] - left, box[1] - top, min(box[2] - left, w), min(box[3] - top, h)])
        assert torch.equal(rec.box, expected.clamp(min=0))
        assert np.array_equal(rec.obj_mask, np.asarray(rec.image)[..., 0] % 7 == 0)
    assert cropped >= 20


def test_normalize_and_pad_centred_and_translated():
    img = coordinate_image(224, 149)
    rec = NormalizeAndPad(224)(record(img, [10.0, 20.0, 50.0, 60.0]))
    top = round((224 - 149) / 2 - 0.1)                          # round(37.4) = 37
    assert top == 37
    rows = torch.nonzero(rec.pixel_mask[:, 0] == 0)[:, 0]
    assert rec.pixel_mask.dtype == torch.int32 and (rows.min(), rows.max()) == (37, 37 + 149 - 1)
    assert bool((rec.pixel_mask[:, 1:] == rec.pixel_mask[:, :1]).all())
    assert bool((rec.image[:, rec.pixel_mask == 1] == 0).all())
    assert torch.allclose(rec.box, torch.tensor([30.0, 40.0 + top, 40.0, 40.0]) / 224)
    np.testing.assert_allclose(to_uint8(rec.image)[37:37 + 149], np.asarray(img, dtype=np.float32), atol=1e-3)
    assert torch.equal(rec.obj_mask[37:37 + 149] > 0, torch.from_numpy(box_to_mask((10, 20, 40, 40), 149, 224)))
    for seed in range(10):
        random.seed(seed)
        rec = NormalizeAndPad(224, translate=True)(record(coordinate_image(150, 100), [0.0, 0.0, 10.0, 10.0]))
        ys, xs = torch.nonzero(rec.pixel_mask == 0, as_tuple=True)
        top, left = int(ys.min()), int(xs.min())
        assert (int(ys.max()) - top, int(xs.max()) - left) == (99, 149)
        assert torch.allclose(rec.box, torch.tensor([left + 5.0, top + 5.0, 10.0, 10.0]) / 224)
        assert rec.obj_mask.sum() == 100 and bool((rec.obj_mask[top:top + 10, left:left + 10] == 1).all())


def test_eval_pipeline_matches_official_formula():
    img = coordinate_image(640, 427)
    rec = make_transforms(224, train=False)(record(img, [100.0, 50.0, 300.0, 400.0]))
    ratio = 224 / 640
    new_h = round(427 * ratio)                                 # 149
    top = round((224 - new_h) / 2 - 0.1)
    x0, y0, x1, y1 = 100 * ratio, 50 * ratio + top, 300 * ratio, 400 * ratio + top
    expected = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]) / 224
    assert torch.allclose(rec.box, expected, atol=1e-6)
    assert int((rec.pixel_mask == 0).sum()) == 224 * new_h


def test_eval_transform_is_deterministic(tmp_path):
    draw_scene(str(tmp_path / "a.jpg"))
    outs = []
    for seed in (0, 1):
        random.seed(seed)
        outs.append(make_transforms(224, train=False)(record(Image.open(tmp_path / "a.jpg"), [180.0, 140.0, 400.0, 300.0])))
    assert torch.equal(outs[0].image, outs[1].image) and torch.equal(outs[0].box, outs[1].box)
    assert torch.equal(outs[0].obj_mask, outs[1].obj_mask) and torch.equal(outs[0].pixel_mask, outs[1].pixel_mask)


@pytest.mark.parametrize("phrase", ["man on the left", "top shelf", "the middle one", "bottom right", "leftmost cup"])
def test_spatial_phrases_never_take_the_crop_branch(phrase):
    first = lambda r: (r.phrase, "first")            # noqa: E731
    second = lambda r: (r.phrase, "second")          # noqa: E731
    select = RandomSelect(first, second, p=1.0)
    assert select(record(coordinate_image(8, 8), [0.0, 0.0, 4.0, 4.0], phrase=phrase))[1] == "first"
    assert select(record(coordinate_image(8, 8), [0.0, 0.0, 4.0, 4.0], phrase="the red cup"))[1] == "second"


def test_train_scales_and_translation():
    t = make_transforms(224, train=True, aug_scale=True, aug_translate=True)
    sizes, offsets = set(), set()
    for seed in range(60):
        random.seed(seed)
        rec = t(record(coordinate_image(300, 200), [30.0, 40.0, 90.0, 120.0]))
        ys, xs = torch.nonzero(rec.pixel_mask == 0, as_tuple=True)
        sizes.add(int(xs.max() - xs.min() + 1))
        offsets.add((int(ys.min()), int(xs.min())))
    assert sizes == {224 - 32 * i for i in range(7)}
    assert len(offsets) > 30
    assert make_transforms(64, train=True, aug_scale=True).transforms[0].first.sizes == [64, 32]


def test_fast_jpeg_draft_decoding_is_close_to_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    photo = np.stack([128 + 100 * np.sin(x / 37 + y / 53), 128 + 100 * np.cos(x / 23), 128 + 80 * np.sin(y / 17)], -1)
    photo[100:300, 200:450] = (230, 20, 20)
    Image.fromarray((photo + rng.normal(0, 8, photo.shape)).clip(0, 255).astype(np.uint8)).save(tmp_path / "p.jpg",
                                                                                               quality=90)
    lazy = Image.open(tmp_path / "p.jpg")
    small = resize_image(lazy, (224, 168), fast_jpeg=True)
    assert lazy.size == (320, 240)                             # decoded at 1/2 scale, never at full size
    full = Image.open(tmp_path / "p.jpg").convert("RGB").resize((224, 168), Image.BILINEAR)
    diff = np.abs(np.asarray(small, dtype=np.float32) - np.asarray(full, dtype=np.float32))
    assert diff.mean() < 1.5 and np.percentile(diff, 99) < 8
    t = make_transforms(224, train=True, fast_jpeg=True)
    box = [200.0, 100.0, 450.0, 300.0]
    random.seed(0)
    a = t(record(Image.open(tmp_path / "p.jpg"), box))
    random.seed(0)
    b = t(record(Image.open(tmp_path / "p.jpg").convert("RGB"), box))
    assert torch.equal(a.box, b.box) and torch.equal(a.obj_mask, b.obj_mask)
    assert np.abs(to_uint8(a.image) - to_uint8(b.image)).mean() < 1.5


def test_box_mask_equals_pycocotools_fill_of_the_box_polygon():
    """box_to_mask (the box target, kept as it was) equals pycocotools' fill of the box's polygon, pixel for pixel,
    for fractional, negative-extent, empty and out-of-image boxes; only an edge exactly on a pixel centre (x.5)
    may break the tie the other way."""
    rng = random.Random(0)
    coords = lambda lo, hi: rng.choice([rng.uniform(lo, hi), rng.randint(lo, hi), 0])
    for _ in range(3000):
        h, w = rng.randint(1, 30), rng.randint(1, 30)
        x, y, bw, bh = coords(-8, 35), coords(-8, 35), coords(-15, 30), coords(-15, 30)
        polygon = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
        np.testing.assert_array_equal(box_to_mask((x, y, bw, bh), h, w), polygons_to_mask(polygon, h, w),
                                      err_msg=f"box {(x, y, bw, bh)} in {w}x{h}")
    # x in [1.5, 3.5), y in [0.2, 1.1): the pixels centred at (1.5, 0.5) and (2.5, 0.5)
    assert np.argwhere(box_to_mask((1.5, 0.2, 2.0, 0.9), 3, 5)).tolist() == [[0, 1], [0, 2]]
