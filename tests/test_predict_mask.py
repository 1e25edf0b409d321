"""Masks (README, "Segmentation masks"): Grounder.ground(mask=True), predict.py --mask (overlay, PNGs, COCO RLE
in the JSON lines), utils.visualize.overlay_masks, torch.hub, and the error for a model without the segmentation
head."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.tokens import tokenize
from models.api import Grounder, prepare
from tests.conftest import REPO
from tests.test_predict import noise_image, run_main
from utils.visualize import PALETTE, draw_boxes, overlay_masks

# non-square sizes (w, h), both orientations, one smaller than the input side
SIZES = [(150, 90), (33, 101), (640, 480)]


@pytest.fixture(scope="module")
def seg_grounder(tiny_seg):
    return Grounder.from_checkpoint(tiny_seg[0])


def test_mask_has_the_original_image_size_and_is_the_head_through_the_letterbox(seg_grounder):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]
    texts = ["the left one", "a red circle", "the big square"]
    hits = seg_grounder.ground(images, texts, mask=True)
    prepared = [prepare(im, 64) for im in images]
    model = seg_grounder.model
    with torch.inference_mode():
        logits = model(torch.stack([p.image for p in prepared]), torch.stack([p.pixel_mask for p in prepared]),
                       tokenize(texts, model.context_length), outputs=["box", "seg_map"])["seg_map"]
    for (w, h), hit, p, seg in zip(SIZES, hits, prepared, logits):
        assert hit.mask.shape == (h, w) and hit.mask.dtype == bool
        assert hit.mask.any() and not hit.mask.all()          # random weights: a mask of both values
        assert np.array_equal(hit.mask, p.letterbox.mask_to_original(seg[0], threshold=0.5))


def test_the_segmentation_head_runs_only_when_a_mask_is_asked(seg_grounder, monkeypatch):
    head = seg_grounder.model.seg_head
    calls = []
    original = head.forward
    monkeypatch.setattr(head, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    img = Image.new("RGB", (64, 40), (10, 20, 30))
    assert seg_grounder.ground([img], ["a"])[0].mask is None and calls == []
    assert seg_grounder.ground([img], ["a"], mask=True)[0].mask.shape == (40, 64) and calls == [1]


def test_a_model_without_the_segmentation_head_is_refused_with_the_fix(grounder):
    with pytest.raises(ValueError, match="trained without the segmentation head.*--use_mask_loss"):
        grounder.ground([Image.new("RGB", (64, 40))], ["a"], mask=True)


def test_overlay_blends_inside_the_mask_and_leaves_the_rest_unchanged():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    before = np.asarray(image).copy()
    first = np.zeros((30, 50), bool)
    first[5:20, 10:30] = True
    second = np.zeros((30, 50), bool)
    second[15:25, 25:45] = True                               # overlaps the first
    out = np.asarray(overlay_masks(image, [first, second], colours=[(255, 0, 0), (0, 0, 255)], alpha=0.5),
                     dtype=np.float64)
    assert np.array_equal(np.asarray(image), before)          # the input is left unchanged
    outside = ~(first | second)
    assert np.array_equal(out[outside], before[outside])
    only_first = first & ~second
    assert np.abs(out[only_first] - (before[only_first] + [255, 0, 0]) / 2).max() <= 0.5
    both = first & second                                      # the later mask over the earlier one
    assert np.abs(out[both] - ((before[both] + [255, 0, 0]) / 2 + [0, 0, 255]) / 2).max() <= 0.75
    with pytest.raises(ValueError, match="image's \\[height, width\\]"):
        overlay_masks(image, [first.T], colours=[(255, 0, 0)])


def test_predict_mask_writes_the_overlay_the_pngs_and_rle_json_lines(tiny_seg, seg_grounder, tmp_path, capsys):
    from pycocotools import mask as coco_mask

    image = noise_image(tmp_path / "photo.png", (150, 90))
    out = tmp_path / "out" / "pred.png"
    texts = ["the man on the left", "a red car"]
    rc, lines, err = run_main(["--checkpoint", tiny_seg[0], "--image", image, "--text", texts[0], "--text", texts[1],
                               "--out", out, "--mask", "--device", "cpu"], capsys)
    assert rc == 0, err
    results = [json.loads(line) for line in lines]
    with Image.open(image) as im:
        rgb = im.convert("RGB")
    hits = seg_grounder.ground([rgb, rgb], texts, mask=True)
    for k, (r, hit) in enumerate(zip(results, hits)):
        assert r["mask"]["size"] == [90, 150] and isinstance(r["mask"]["counts"], str)
        decoded = coco_mask.decode({"size": r["mask"]["size"], "counts": r["mask"]["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), hit.mask)
        assert r["mask_picture"] == str(tmp_path / "out" / f"pred_mask_{k}.png")
        with Image.open(r["mask_picture"]) as png:
            assert np.array_equal(np.asarray(png), hit.mask)
    # the picture: each mask over the image in its box's colour, then the boxes and captions
    colours = PALETTE[:2]
    expected = draw_boxes(overlay_masks(rgb, [h.mask for h in hits], colours=colours),
                          [h.box_xyxy for h in hits], texts, colours=colours)
    with Image.open(out) as picture:
        assert np.array_equal(np.asarray(picture), np.asarray(expected))


def test_predict_mask_without_the_segmentation_head_is_one_line(tiny, tmp_path, capsys):
    image = noise_image(tmp_path / "a.png", (64, 48))
    rc, lines, err = run_main(["--checkpoint", tiny[0], "--image", image, "--text", "x", "--mask"], capsys)
    assert rc == 2 and not lines and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("predict.py: error: --mask: the checkpoint") and "--use_mask_loss" in err


def test_torch_hub_serves_the_masks(tiny_seg):
    grounder = torch.hub.load(str(REPO), "hivg", source="local", checkpoint=str(tiny_seg[0]))
    [hit] = grounder.ground([Image.new("RGB", (50, 30), (200, 30, 30))], ["the red square"], mask=True)
    assert hit.mask.shape == (30, 50) and hit.mask.dtype == bool


def test_jsonl_mask_without_out_dir_gives_the_json_lines_alone(tiny_seg, tmp_path, capsys):
    noise_image(tmp_path / "a.png", (70, 40))
    (tmp_path / "req.jsonl").write_text(json.dumps({"image": "a.png", "text": "the left one"}) + "\n")
    rc, lines, err = run_main(["--checkpoint", tiny_seg[0], "--jsonl", tmp_path / "req.jsonl", "--mask"], capsys)
    assert rc == 0, err
    [result] = [json.loads(line) for line in lines]
    assert result["mask"]["size"] == [40, 70] and "mask_picture" not in result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "req.jsonl"]
