"""export.py, models/export.py and utils/onnx_grounder.py (README, "Export (ONNX)"): the graph at full text
length equals HiVG.forward, onnxruntime's boxes equal eager PyTorch's (tiny model, both bridges, and ViT-B/16
with random weights; batches of 1 and 3, texts of different lengths), predict.py --onnx gives predict.py's
pixel boxes without model code, and bad input is one line, exit 2.

Those that export or run onnxruntime need requirements-export.txt (onnx, onnxscript, onnxruntime); without it
they are skipped, unless HIVG_REQUIRE_EXPORT=1 (set by .ci/run) makes that a failure.
"""
import argparse
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import predict
from datasets.tokens import tokenize
from models.api import Grounder
from models.export import INPUT_NAMES as INPUTS, ExportHiVG
from models.flags import add_model_args
from models.hivg import build_model
from models.lora import merge_lora
from tests.conftest import REPO
from tests.test_predict import noise_image, run_main
from tests.tolerance import assert_close_fp32, model_depth

REQUIRED = os.environ.get("HIVG_REQUIRE_EXPORT") == "1"
HOW = "pip install -r requirements-export.txt"
BOX_ATOL = 1e-4       # the user's tolerance on boxes in [0, 1]
TEXTS = ["a", "the small blue square right of the big red circle at the top of the picture", "green"]


def need_export_requirements():
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(module)
        except ImportError as e:
            message = f"needs {module} ({e}): {HOW}"
            if REQUIRED:
                pytest.fail(f"HIVG_REQUIRE_EXPORT=1 and this test {message}")
            pytest.skip(message)


def random_model(*flags) -> torch.nn.Module:
    """A HiVG of `flags` with random weights, non-zero LoRA merged, in eval mode."""
    torch.manual_seed(0)
    args = add_model_args(argparse.ArgumentParser()).parse_args(["--hi_lora_stage", "1", *flags])
    model = build_model(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    merge_lora(model)
    return model.eval()


def exported(model, folder):
    """(the ExportHiVG module, the OnnxGrounder of its ONNX file) for `model`."""
    need_export_requirements()
    import export
    from utils.onnx_grounder import OnnxGrounder
    module = ExportHiVG(model)
    path = folder / "model.onnx"
    export.export_onnx(module, path, checkpoint="random", optimize=False)    # half the time; same graph ops
    return module, OnnxGrounder.from_file(path, threads=2)


def inputs(model, batch: int, seed: int = 0):
    """Letterboxed random images (each padded differently) and texts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    S = model.image_size
    images = torch.randn(batch, 3, S, S, generator=g)
    pixel_mask = torch.zeros(batch, S, S, dtype=torch.int32)
    for i in range(batch):
        pixel_mask[i, :, S - (i + 1) * S // 5:] = 1       # right padding, 1/5 .. 3/5 of the frame
    return images, pixel_mask, tokenize([TEXTS[(seed + i) % len(TEXTS)] for i in range(batch)], model.context_length)


def assert_onnx_matches_eager(module, grounder, batch: int):
    feeds = inputs(module.model, batch, seed=batch)
    with torch.no_grad():
        eager = dict(zip(module.output_names, module(*feeds)))
    onnx = grounder.session.run(None, dict(zip(INPUTS, (t.numpy() for t in feeds))))
    onnx = dict(zip(grounder.output_names, map(torch.from_numpy, onnx)))
    assert onnx.keys() == eager.keys()
    torch.testing.assert_close(onnx["pred_box"], eager["pred_box"], rtol=0, atol=BOX_ATOL)
    if "seg_map" in eager:    # logits: fp32 rounding of the whole path (tests/tolerance.py)
        assert_close_fp32(onnx["seg_map"], eager["seg_map"], model_depth(module.model.config) + 3, "seg_map")
    return onnx


@pytest.fixture(scope="module")
def tiny_onnx(tiny, tmp_path_factory):
    """The `tiny` checkpoint exported by export.py's command line (per-sample bridge, box only)."""
    need_export_requirements()
    import export
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert export.main(["--checkpoint", str(tiny[0]), "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def b16(tmp_path_factory):
    """ViT-B/16 with random weights and the segmentation head, exported once for this module."""
    return exported(random_model("--model", "ViT-B/16", "--use_mask_loss"), tmp_path_factory.mktemp("b16"))


@pytest.mark.recorded
@pytest.mark.parametrize("bridge", ["per_sample", "official"])
def test_full_text_length_equals_the_batch_length(bridge):
    model = random_model("--model", "tiny", "--imsize", "64", "--use_mask_loss", "--bridge_attention", bridge)
    feeds = inputs(model, 3)
    with torch.no_grad():
        short = model(*feeds, outputs=("box", "seg_map"))
        full = model(*feeds, outputs=("box", "seg_map"), for_export=True)
    for key in ("pred_box", "seg_map"):
        assert_close_fp32(full[key], short[key], model_depth(model.config), key)


@pytest.mark.recorded
def test_onnxruntime_boxes_equal_eager_on_vit_b16_at_batch_3_and_1(b16):
    module, grounder = b16
    in_batch = assert_onnx_matches_eager(module, grounder, 3)
    feeds = {name: t[:1].numpy() for name, t in zip(INPUTS, inputs(module.model, 3, seed=3))}
    alone = grounder.session.run(["pred_box"], feeds)[0]        # per-sample bridge: row 0 of the batch of 3
    torch.testing.assert_close(torch.from_numpy(alone), in_batch["pred_box"][:1], rtol=0, atol=BOX_ATOL)


@pytest.mark.recorded
def test_official_bridge_exports_and_mixes_the_batch_as_eager_does(tmp_path):
    module, grounder = exported(random_model("--model", "tiny", "--imsize", "64", "--use_mask_loss",
                                             "--bridge_attention", "official"), tmp_path)
    assert module.output_names == ("pred_box", "seg_map")
    assert grounder.metadata["hivg.bridge_attention"] == "official"
    for batch in (1, 3):
        assert_onnx_matches_eager(module, grounder, batch)
    feeds = {name: t.numpy() for name, t in zip(INPUTS, inputs(module.model, 3))}
    in_batch = grounder.session.run(["pred_box"], feeds)[0][0]
    alone = grounder.session.run(["pred_box"], {name: v[:1] for name, v in feeds.items()})[0][0]
    assert abs(in_batch - alone).max() > BOX_ATOL      # batch-dependent, as the eager official bridge


@pytest.mark.recorded
@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_boxes_equal_eager_on_the_tiny_checkpoint(tiny, tiny_onnx, batch):
    from utils.onnx_grounder import OnnxGrounder
    module = ExportHiVG(Grounder.from_checkpoint(tiny[0]).model)
    grounder = OnnxGrounder.from_file(tiny_onnx, threads=2)
    assert module.output_names == ("pred_box",) and grounder.output_names == ["pred_box"]
    onnx = assert_onnx_matches_eager(module, grounder, batch)
    feeds = {name: t.numpy() for name, t in zip(INPUTS, inputs(module.model, batch, seed=batch))}
    alone = grounder.session.run(["pred_box"], {name: v[-1:] for name, v in feeds.items()})[0][0]
    torch.testing.assert_close(torch.from_numpy(alone), onnx["pred_box"][-1], rtol=0, atol=BOX_ATOL)


@pytest.mark.parametrize("patch", [8, 16])
def test_exact_patch_mask_equals_the_official_rule_on_every_letterbox(patch):
    """Patch sides whose resize weights are dyadic (the tiny models, B/16); for L/14 see README "Export (ONNX)"."""
    from models.hivg import exact_patch_padding_mask, patch_padding_mask
    S = 4 * patch
    masks = torch.ones(2 * S, S, S, dtype=torch.int32)
    for k in range(S):        # every centred pad width, in columns then in rows
        left = round(k / 2.0 - 0.1)
        masks[k, :, left:left + S - k] = 0
        masks[S + k, left:left + S - k, :] = 0
    exact, official = exact_patch_padding_mask(masks, (4, 4)), patch_padding_mask(masks, (4, 4))
    assert exact.any() and not exact.all()
    assert torch.equal(exact, official)


def test_predict_onnx_gives_predict_boxes_without_model_code(tiny, tiny_onnx, tmp_path, capsys):
    image = noise_image(tmp_path / "street.png", (50, 30))     # letterboxed: padding top and bottom
    texts = ["--text", "a red circle", "--text", "the big blue square on the left"]
    rc, torch_lines, _ = run_main(["--checkpoint", tiny[0], "--image", image, *texts, "--out", tmp_path / "a.png"],
                                  capsys)
    assert rc == 0
    code = ("import sys, predict; rc = predict.main(sys.argv[1:]); "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'models'], 'model code imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, "--onnx", str(tiny_onnx), "--image", str(image), *texts,
                           "--out", str(tmp_path / "b.png")], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    onnx_lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    torch_lines = [json.loads(line) for line in torch_lines]
    assert [o["box_xyxy"] for o in onnx_lines] == [t["box_xyxy"] for t in torch_lines]   # 2 decimals, pixels
    assert (tmp_path / "b.png").is_file()


def test_bad_input_is_one_line_and_exit_2(tiny, tiny_onnx, tmp_path, capsys):
    import export
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("hello")
    image = noise_image(tmp_path / "img.png", (40, 40))
    cases = [
        (export.main, ["--checkpoint", tmp_path / "missing.pth", "--out", tmp_path / "m.onnx"], "--checkpoint"),
        (export.main, ["--checkpoint", not_onnx, "--out", tmp_path / "m.onnx"], "--checkpoint"),
        (export.main, ["--checkpoint", tiny[0], "--out", tmp_path / "no" / "m.onnx"], "--out"),
        (export.main, ["--checkpoint", tiny[0], "--out", tmp_path], "--out"),
        (predict.main, ["--onnx", not_onnx, "--image", image, "--text", "a"], "--onnx"),
        (predict.main, ["--onnx", other_model_onnx(tmp_path), "--image", image, "--text", "a"], "--onnx"),
        (predict.main, ["--onnx", tiny_onnx, "--image", image, "--text", "a", "--mask"], "--mask"),  # box only
    ]
    capsys.readouterr()     # what making the cases printed (the exporter's messages) is not the error line
    for main, argv, flag in cases:
        assert main([str(a) for a in argv]) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and flag in err and "Traceback" not in err, err
    for flags, named in (["--heatmap"], "--heatmap"), (["--bridge_attention", "official"], "--bridge_attention"):
        with pytest.raises(SystemExit) as e:    # what the exported graph does not compute, or fixed at export
            predict.main(["--onnx", str(tiny_onnx), "--image", str(image), "--text", "a", *flags])
        assert e.value.code == 2 and named in capsys.readouterr().err


def test_onnx_masks_are_the_eager_masks_on_the_original_image(tiny_seg, tmp_path):
    """A model with the segmentation head: OnnxGrounder's masks are [H, W] bool of the original (non-square)
    image and agree with models.api.Grounder's but for pixels whose logit rounds across the threshold."""
    need_export_requirements()
    import export
    from utils.onnx_grounder import OnnxGrounder
    path = tmp_path / "seg.onnx"
    assert export.main(["--checkpoint", str(tiny_seg[0]), "--out", str(path)]) == 0
    image = Image.open(noise_image(tmp_path / "street.png", (50, 30)))
    texts = ["a red circle", "the big blue square on the left"]
    onnx = OnnxGrounder.from_file(path, threads=2).ground([image, image], texts, mask=True)
    eager = Grounder.from_checkpoint(tiny_seg[0]).ground([image, image], texts, mask=True)
    for o, e in zip(onnx, eager):
        assert o.mask.shape == e.mask.shape == (30, 50) and o.mask.dtype == bool
        assert (o.mask != e.mask).mean() < 0.005, (o.mask != e.mask).mean()
    assert any(e.mask.any() and not e.mask.all() for e in eager)     # a comparison of masks with content


def other_model_onnx(folder):
    """An ONNX file of another model (a linear layer), without HiVG's metadata."""
    path = folder / "linear.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2).eval(), (torch.zeros(1, 4),), str(path), dynamo=True, optimize=False,
                      verbose=False)
    return path


def test_the_export_module_needs_eval_mode_and_merged_lora():
    model = random_model("--model", "tiny", "--imsize", "64")
    with pytest.raises(ValueError, match="merge"):
        ExportHiVG(build_model(add_model_args(argparse.ArgumentParser()).parse_args(
            ["--model", "tiny", "--imsize", "64", "--hi_lora_stage", "1"])).eval())
    with pytest.raises(ValueError, match="eval mode"):
        ExportHiVG(model.train())
