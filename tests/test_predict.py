"""predict.py and utils/visualize.py: letterbox inverse, the CLI on our and the authors' checkpoints,
heat maps, pictures, evaluation-picture helpers, clear errors."""
import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from datasets.tokens import tokenize
from datasets.transforms import Letterbox, Record, make_transforms
from models.api import Grounder, Prepared
from models.weights import load_model
from tests.conftest import BAD_CHECKPOINTS, FIXTURES, REPO, write_bad_checkpoint
from tests.tolerance import assert_close_fp32, model_depth
from utils import visualize as vis

OFFICIAL = FIXTURES / "hivg_tiny_unc+_stage0"
RED = (230, 20, 20)
# non-square sizes (w, h), odd and even pads, both orientations, one smaller than the input side
SIZES = [(640, 480), (480, 640), (333, 101), (101, 333), (65, 17), (17, 65), (50, 30), (64, 64), (1000, 251)]


def run_main(argv, capsys):
    """(exit status, stdout lines, stderr) of predict.main."""
    try:
        rc = predict.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, [line for line in out.splitlines() if line.strip()], err


def noise_image(path, size_wh, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size_wh[1], size_wh[0], 3), dtype=np.uint8)).save(path)
    return path


def red_box_image(path, size_wh, box, **save_kw):
    """Dark grey image with a red rectangle filling the xyxy pixel box (integer corners)."""
    img = np.full((size_wh[1], size_wh[0], 3), 40, np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = RED
    Image.fromarray(img).save(path, **save_kw)
    return path


# ----------------------------------------------------------------------------------------- CLI, boxes

class RedBoxOracle(torch.nn.Module):
    """Stands in for HiVG: its box is the extent of the red pixels of the padded input (by construction in
    the padded frame), so predict.py must return the drawn rectangle in original pixels."""

    def __init__(self, image_size=224):
        super().__init__()
        self.image_size, self.grid, self.context_length = image_size, (image_size // 16,) * 2, 77
        self.config = argparse.Namespace(outputs=["box"])
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images, pixel_mask, ids, outputs=None):
        mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        boxes = []
        for img in images:
            rgb = img * std + mean
            red = (rgb[0] > 0.6) & (rgb[1] < 0.4)
            ys, xs = torch.nonzero(red, as_tuple=True)
            x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
            boxes.append(torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]).float() / self.image_size)
        return {"pred_box": torch.stack(boxes)}


def test_jsonl_boxes_map_back_to_original_pixels_for_non_square_images(tmp_path, monkeypatch, capsys):
    cases = [("wide.png", (600, 240), (100, 60, 260, 200)), ("tall.png", (150, 420), (20, 300, 140, 410)),
             ("big.jpg", (1200, 500), (700, 100, 1100, 420))]       # JPEG decoded in draft mode
    lines = []
    for name, size, box in cases:
        red_box_image(tmp_path / name, size, box, **({"quality": 98} if name.endswith("jpg") else {}))
        lines.append(json.dumps({"image": name, "text": f"the red box in {name}"}))
    lines.insert(1, json.dumps({"image": "wide.png", "text": "the same image again"}))
    (tmp_path / "req.jsonl").write_text("\n".join(lines) + "\n\n")
    oracle = RedBoxOracle(224)
    monkeypatch.setattr(predict, "load_grounder", lambda *a, **k: Grounder(oracle))
    rc, out, err = run_main(["--checkpoint", tmp_path / "req.jsonl", "--jsonl", tmp_path / "req.jsonl",
                             "--batch_size", 2, "--out_dir", tmp_path / "pics"], capsys)
    assert rc == 0, err
    results = [json.loads(line) for line in out]
    assert [r["image"] for r in results] == ["wide.png", "wide.png", "tall.png", "big.jpg"]
    expected = {name: (size, box) for name, size, box in cases}
    for r in results:
        size, box = expected[r["image"]]
        tol = 1.5 / Letterbox.of(*size, 224).ratio                # 1.5 input pixels
        assert np.allclose(r["box_xyxy"], box, atol=tol), (r, box, tol)
    for name, size, _ in cases:                # one picture per image, its width, the captions below it
        with Image.open(tmp_path / "pics" / f"{name.rsplit('.', 1)[0]}_hivg.png") as pic:
            assert pic.width == max(size[0], 320) and pic.height > size[1]


def test_single_image_cli_on_our_checkpoint(tiny, tmp_path, capsys):
    path, model = tiny
    image = noise_image(tmp_path / "photo.png", (150, 90))
    out = tmp_path / "out" / "pred.png"
    texts = ["the man on the left", "a red car"]
    rc, lines, err = run_main(["--checkpoint", path, "--image", image, "--text", texts[0], "--text", texts[1],
                               "--out", out, "--heatmap", "--token_map", "--device", "cpu"], capsys)
    assert rc == 0, err
    results = [json.loads(line) for line in lines]
    assert [r["text"] for r in results] == texts
    # reference: the checkpoint rebuilt independently, unmerged, on the eval transform
    ref = load_model(path, merge=False)
    with Image.open(image) as im:
        rec = make_transforms(64, train=False)(Record(im.convert("RGB"), torch.zeros(4), "", np.zeros((90, 150), bool)))
    with torch.no_grad():
        pred = ref(rec.image[None].expand(2, -1, -1, -1), rec.pixel_mask[None].expand(2, -1, -1),
                   tokenize(texts, ref.context_length), outputs=["box"])["pred_box"]
    lb = Letterbox.of(150, 90, 64)
    for r, p in zip(results, pred):
        assert np.allclose(r["box_xyxy"], lb.to_original(p).tolist(), atol=0.02)
        assert all(0 <= v <= lim for v, lim in zip(r["box_xyxy"], (150, 90, 150, 90)))
    for f in [out] + [tmp_path / "out" / f"pred_{k}_{i}.png" for k in ("attn", "tokmap") for i in (0, 1)]:
        with Image.open(f) as pic:
            assert pic.width == 320 and pic.height > 2 * 90, f   # enlarged x2 to 256 px, captions below
    assert results[1]["attn_picture"] == str(tmp_path / "out" / "pred_attn_1.png")
    assert "wrote" in err and "Traceback" not in err


def test_default_picture_path_is_beside_the_working_directory(tiny, tmp_path, monkeypatch, capsys):
    image = noise_image(tmp_path / "street.jpg", (80, 120))
    monkeypatch.chdir(tmp_path)
    rc, lines, err = run_main(["--checkpoint", tiny[0], "--image", image, "--text", "x"], capsys)
    assert rc == 0, err
    assert len(lines) == 1 and set(json.loads(lines[0])) == {"image", "text", "box_xyxy", "score"}
    assert 0 <= json.loads(lines[0])["score"] <= 1
    with Image.open(tmp_path / "street_hivg.png") as pic:
        assert pic.width == 320 and pic.height > 3 * 120


# ----------------------------------------------------------------------------------------- heat maps

def test_overlay_puts_a_hot_patch_where_it_is_in_the_original_image():
    lb = Letterbox.of(300, 100, 64)                      # image rows 27..37 (approx.) of the frame
    heat = np.zeros((8, 8), np.float32)
    heat[3, 6] = 1.0                                          # frame pixels x 48..56, y 24..32
    up = vis.heatmap_to_image(heat, lb.crop_box, lb.size, image_size=(300, 100))
    assert up.shape == (100, 300)
    y, x = np.unravel_index(np.argmax(up), up.shape)
    cx, cy = (52 - lb.left) / lb.ratio, (28 - lb.top) / lb.ratio
    assert abs(x - cx) <= 6 and abs(y - cy) <= 6, (x, y, cx, cy)
    pic = vis.overlay_heatmap(Image.new("RGB", (300, 100), (128, 128, 128)), heat, lb.crop_box, frame_size=lb.size)
    assert pic.size == (300, 100)
    r, g, b = np.asarray(pic, dtype=int)[y, x]
    assert r > b                                              # hot end of the colour map
    assert tuple(vis.colormap(np.array([0.0, 1.0]))[0]) == (0, 0, 128)


# ----------------------------------------------------------------------------------------- authors' checkpoints

@pytest.mark.recorded
def test_official_checkpoint_is_converted_on_load_and_matches_the_official_model(tmp_path, capsys):
    config = json.loads((OFFICIAL / "config.json").read_text())
    state = torch.load(OFFICIAL / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    path = tmp_path / "official.pth"
    torch.save({"model": state, "args": argparse.Namespace(**config["hivg_args"])}, path)
    official = predict.load_grounder(path, torch.device("cpu"), hf_clip_config=str(OFFICIAL / "config.json"))
    model = official.model
    assert not any("lora" in k for k in model.state_dict()) and model.config.bridge_attention == "per_sample"
    inputs = torch.load(OFFICIAL / "inputs.pth", weights_only=True)
    golden = torch.load(OFFICIAL / "outputs.pth", weights_only=True)["per_sample_int32_mask"]
    prepared = [Prepared(inputs["img"][i], inputs["img_mask_int32"][i], Letterbox.of(w, h, 64))
                for i, (h, w) in enumerate(inputs["raw_sizes_hw"])]
    preds = official.ground_prepared(prepared, inputs["texts"], token_map=True)
    depth = model_depth(model.config)
    assert_close_fp32(torch.stack([p.box_padded for p in preds]), golden["pred_box"], depth=depth, name="pred_box")
    assert_close_fp32(torch.from_numpy(np.stack([p.token_map.ravel() for p in preds])),
                      golden["visu_token_similarity"], depth=depth, name="token_map")
    # the whole command line, too
    image = noise_image(tmp_path / "img.png", (64, 40))
    rc, lines, err = run_main(["--checkpoint", path, "--hf_clip_config", OFFICIAL / "config.json", "--image", image,
                               "--text", "left zebra", "--out", tmp_path / "o.png"], capsys)
    assert rc == 0 and len(lines) == 1, err


# ----------------------------------------------------------------------------------------- errors

def test_unreadable_image_is_a_clear_error_without_traceback(tiny, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    proc = subprocess.run([sys.executable, "predict.py", "--checkpoint", str(tiny[0]), "--image", str(bad),
                           "--text", "x"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--image" in proc.stderr and "broken.png" in proc.stderr and "cannot be read as an image" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("kind", ["missing", "folder", "truncated"])
def test_bad_images(tiny, tmp_path, capsys, kind):
    path = tmp_path / "img.png"
    if kind == "folder":
        path.mkdir()
    elif kind == "truncated":
        noise_image(path, (64, 48))
        path.write_bytes(path.read_bytes()[:200])
    rc, lines, err = run_main(["--checkpoint", tiny[0], "--image", path, "--text", "x"], capsys)
    assert rc == 2 and not lines
    assert f"--image {path}" in err
    assert {"missing": "does not exist", "folder": "is a folder", "truncated": "cannot be decoded"}[kind] in err


def test_the_input_image_is_never_overwritten(tmp_path, capsys):
    image = noise_image(tmp_path / "a.png", (64, 48))
    before = image.read_bytes()
    rc, lines, err = run_main(["--checkpoint", tmp_path / "c.pth", "--image", image, "--text", "x", "--out", image],
                              capsys)
    assert rc == 2 and "would overwrite the input image" in err and image.read_bytes() == before


def test_empty_text_is_refused(tiny, tmp_path, capsys):
    image = noise_image(tmp_path / "a.png", (64, 48))
    rc, lines, err = run_main(["--checkpoint", tiny[0], "--image", image, "--text", "ok", "--text", "   "], capsys)
    assert rc == 2 and not lines and "--text #2" in err and "empty" in err


@pytest.mark.parametrize("content,expect", [
    ("dict", "is neither a HiVG checkpoint nor CLIP weights"),
    ("state_dict", ": neither HF CLIPModel nor open_clip CLIP key names"),
    ("foreign_model", "is not a checkpoint this project can read"),
])
def test_checkpoint_that_is_not_hivg_is_refused(tmp_path, capsys, content, expect):
    image = noise_image(tmp_path / "a.png", (64, 48))
    path = tmp_path / "x.pth"
    if content == "dict":
        torch.save({"epoch": 3}, path)
    elif content == "state_dict":
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    else:
        torch.save({"model": torch.nn.Linear(2, 2).state_dict(), "args": {"model": "tiny"}}, path)
    rc, lines, err = run_main(["--checkpoint", path, "--image", image, "--text", "x"], capsys)
    assert rc == 2 and not lines
    assert err.startswith(f"predict.py: error: --checkpoint {path}") and expect in err and err.count("\n") == 1, err


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_files_one_line_naming_the_flag(tiny, tmp_path, capsys, kind):
    image = noise_image(tmp_path / "a.png", (64, 48))
    path = write_bad_checkpoint(kind, tmp_path, tiny[0])
    rc, lines, err = run_main(["--checkpoint", path, "--image", image, "--text", "x"], capsys)
    assert rc == 2 and not lines
    assert err.startswith(f"predict.py: error: --checkpoint {path} {BAD_CHECKPOINTS[kind]}"), err
    assert err.count("\n") == 1, err
    assert "weights_only" not in err and not (tmp_path / "ran").exists()


def test_checkpoint_errors_name_the_flag(tiny, tmp_path, capsys):
    image = noise_image(tmp_path / "a.png", (64, 48))
    rc, _, err = run_main(["--checkpoint", tmp_path / "nope.pth", "--image", image, "--text", "x"], capsys)
    assert rc == 2 and "--checkpoint" in err and "does not exist" in err
    rc, _, err = run_main(["--checkpoint", tiny[0], "--hf_clip_config", OFFICIAL / "config.json", "--image", image,
                           "--text", "x"], capsys)
    assert rc == 2 and "drop --hf_clip_config" in err


@pytest.mark.parametrize("line,expect", [
    ("{not json", "line 2 is not JSON"),
    ('{"image": "a.png"}', 'needs an object with "image" and "text"'),
    ('{"image": "a.png", "text": ""}', "line 2: the text is empty"),
    ('{"image": "missing.png", "text": "x"}', "line 2: image"),
])
def test_jsonl_errors_name_the_line(tiny, tmp_path, capsys, line, expect):
    noise_image(tmp_path / "a.png", (64, 48))
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text(json.dumps({"image": "a.png", "text": "fine"}) + "\n" + line + "\n")
    rc, lines, err = run_main(["--checkpoint", tiny[0], "--jsonl", jsonl], capsys)
    assert rc == 2 and not lines and expect in err, err


@pytest.mark.parametrize("argv,expect", [
    (["--image", "a.png"], "--image needs at least one --text"),
    (["--jsonl", "r.jsonl", "--text", "x"], "--text goes with --image"),
    (["--jsonl", "r.jsonl", "--heatmap"], "need --out_dir"),
    (["--image", "a.png", "--text", "x", "--out", "o.xyz"], "unknown picture format"),
    (["--image", "a.png", "--text", "x", "--batch_size", "0"], "--batch_size"),
])
def test_flag_errors(capsys, argv, expect):
    rc, _, err = run_main(["--checkpoint", "c.pth"] + argv, capsys)
    assert rc == 2 and expect in err


def test_cuda_unavailable_is_a_clear_error(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    image = noise_image(tmp_path / "a.png", (64, 48))
    rc, _, err = run_main(["--checkpoint", tiny[0], "--image", image, "--text", "x", "--device", "cuda"], capsys)
    assert rc == 2 and "--device cuda" in err and "--device cpu" in err


# ----------------------------------------------------------------------------------------- eval pictures

def test_selection_is_deterministic_half_hits_half_misses():
    ious = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.95, 0.05, 0.6, 0.4]   # hits at even indices
    sel = vis.select_for_visualization(ious, 4)
    assert sel == vis.select_for_visualization(list(ious), 4) == sorted(sel)
    assert sum(ious[i] >= 0.5 for i in sel) == 2 and len(set(sel)) == 4
    assert sum(ious[i] >= 0.5 for i in vis.select_for_visualization(ious, 5)) == 3
    few_misses = [0.9] * 9 + [0.0]
    assert vis.select_for_visualization(few_misses, 6) == [0, 2, 4, 6, 8, 9]   # the one miss, 5 hits
    assert vis.select_for_visualization(ious, 100) == list(range(10))
    assert vis.select_for_visualization(ious, 0) == []
    assert vis.select_for_visualization([float("nan"), 0.7], 1) == [1]
    # evenly spread over the group, not the first few
    many = [1.0] * 100
    assert vis.select_for_visualization(many, 4) == [12, 37, 62, 87]


def test_draw_prediction_and_draw_boxes_colours():
    img = Image.new("RGB", (200, 120), (0, 0, 0))
    pic = vis.draw_prediction(img, [20, 30, 80, 90], [100, 10, 180, 100], text="the dog on the left", iou=0.0,
                             min_side=200)
    assert pic.width >= 200 and pic.height > 120
    px = np.asarray(pic)
    assert tuple(px[60, 20]) == vis.CYAN and tuple(px[50, 180]) == vis.GREEN
    assert px[120:].any()                                          # caption strip has text
    boxed = vis.draw_boxes(img, [[10, 50, 60, 110]], ["a"])
    assert boxed.width == 2 * img.width and boxed.height > 2 * img.height         # enlarged to 256 px at least
    assert tuple(np.asarray(boxed)[160, 20]) == vis.PALETTE[0]
    assert not np.asarray(img).any()                               # input untouched
    small = vis.draw_prediction(Image.new("RGB", (64, 40)), [2, 4, 30, 20], [10, 10, 50, 30], text="x", iou=0.7)
    assert small.width >= 64 * 4 and small.height > 40 * 4                 # enlarged x4, boxes with it
    assert tuple(np.asarray(small)[50, 8]) == vis.CYAN and tuple(np.asarray(small)[60, 200]) == vis.GREEN


def test_small_image_pictures_are_enlarged_with_whole_captions_that_cover_no_box():
    img = Image.new("RGB", (64, 48), (90, 90, 90))
    text = "the small blue triangle to the left of the large red square below the green star on the left"
    boxes = [[1, 0, 30, 20], [34, 20, 63, 47]]                # touching the top and the bottom edges
    pic = vis.draw_boxes(img, boxes, [text, "x"], colours=[vis.PALETTE[0], vis.PALETTE[1]])
    k = 4                                                     # 64 px -> at least 256 px; strip 320 px wide
    assert pic.width == 320 and pic.height > 48 * k
    px = np.asarray(pic)
    for (x0, y0, x1, y1), colour in zip(boxes, vis.PALETTE):  # every outline pixel is still the box's colour
        xs, ys = slice(x0 * k, x1 * k + 1), slice(y0 * k, y1 * k + 1)      # PIL's corners are inclusive
        outline = np.concatenate([px[y0 * k, xs], px[y1 * k, xs], px[ys, x0 * k], px[ys, x1 * k]])
        assert (outline == colour).all()
    seen = {tuple(c) for c in px[:48 * k, :64 * k].reshape(-1, 3)}
    assert seen == {(90, 90, 90), vis.PALETTE[0], vis.PALETTE[1]}   # nothing but the image and the outlines
    probe = vis.ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = probe.textbbox((0, 0), "Ag", font=vis._font((320, 320)))[3] + 3
    strip = px[48 * k:, line_h + 2:]                           # right of the colour swatches
    assert strip.shape[0] >= 3 * line_h                        # two lines for the long caption, one for "x"
    for i in range(3):                                         # each holds text
        assert (strip[3 + i * line_h:3 + (i + 1) * line_h] > 128).any()
    assert " ".join(vis._wrap(probe, text, vis._font((320, 320)), width=280)) == text     # wrapped, nothing cut


def test_save_eval_pictures_on_a_dataset(tiny_loaded, tmp_path):
    from datasets import build_dataset
    from tests.data_helpers import TARGET_XYWH, args_for, write_layout

    write_layout(str(tmp_path), "unc", splits=("val",), n=3)
    dataset = build_dataset("val", args_for("unc", tmp_path, imsize=64))
    paths = vis.save_eval_pictures(tiny_loaded, dataset, [0.9, 0.1, 0.6], n=2, out_dir=tmp_path / "vis", device="cpu",
                                   prefix="val")
    assert [p.name for p in paths] == ["val_000001_miss.png", "val_000002_hit.png"]   # middle of the hits
    with Image.open(paths[0]) as pic:
        assert pic.width == 640 and pic.height > 480                      # not enlarged
        x, y, w, h = TARGET_XYWH                                   # ground truth drawn in original pixels
        assert tuple(np.asarray(pic)[int(y + h / 2), int(x)]) == vis.GREEN


def test_non_finite_weights_are_refused_at_load_naming_the_tensor_and_the_file(tiny, tmp_path, capsys):
    """A diverged run's weights would print "box_xyxy": [NaN, ...], which is not JSON."""
    content = torch.load(tiny[0], map_location="cpu", weights_only=True)
    content["model"] = {k: v.clone() for k, v in content["model"].items()}
    content["model"]["box_head.layers.0.weight"].fill_(float("nan"))
    path = tmp_path / "diverged.pth"
    torch.save(content, path)
    image = noise_image(tmp_path / "a.png", (64, 48))
    rc, lines, err = run_main(["--checkpoint", path, "--image", image, "--text", "x"], capsys)
    assert rc == 2 and not lines, lines
    assert err.startswith(f"predict.py: error: --checkpoint {path}: tensor box_head.layers.0.weight holds NaN or "
                          "infinite values") and err.count("\n") == 1, err
    with pytest.raises(ValueError, match="tensor box_head.layers.0.weight holds NaN"):
        load_model(path)
