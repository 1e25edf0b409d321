"""Conversion of the authors' HiVG checkpoints: peft spellings, strictness, the converter command."""
import argparse
import json
import re

import pytest
import torch
from PIL import Image

from models.checkpoint_format import FORMAT, model_file
from models.convert import canonical_key, convert_official_state_dict
from tests.conftest import FIXTURES
from utils import parity
from models.weights import load_model, read_weights
from utils.checkpoint import main as convert_main, save_checkpoint

FIXTURE = FIXTURES / "hivg_tiny_unc_stage1"


@pytest.fixture(scope="module")
def official_state():
    return torch.load(FIXTURE / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def model():
    return parity.build_from_fixture(FIXTURE, "official")


def respell_newer_peft(state):
    """peft >= 0.7 spelling: one prefix level fewer and `.base_layer.` before the wrapped weight."""
    out = {}
    for key, value in state.items():
        key = key.replace("base_model.model.base_model.model.", "base_model.model.")
        key = re.sub(r"\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)$", r".\1.base_layer.\2", key)
        out[key] = value
    return out


def test_canonical_key_strips_any_number_of_wrappers():
    base = "clip.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    for n in range(4):
        assert canonical_key(base.replace("clip.", "clip." + "base_model.model." * n)) == base
    assert canonical_key("clip.base_model.model.text_model.encoder.layers.1.self_attn.k_proj.base_layer.bias") == \
        "clip.text_model.encoder.layers.1.self_attn.k_proj.bias"


def test_both_peft_spellings_convert_to_the_same_state(official_state, model):
    expected = model.state_dict()
    old = convert_official_state_dict(official_state, expected)
    new = convert_official_state_dict(respell_newer_peft(official_state), expected)
    assert set(old) == set(new) == set(expected)
    for key in old:
        assert torch.equal(old[key], new[key]), key


def test_qkv_and_lora_land_in_the_fused_slots(official_state, model):
    ours = convert_official_state_dict(official_state, model.state_dict())
    prefix = "clip.base_model.model.base_model.model.vision_model.encoder.layers.2.self_attn."
    w = torch.cat([official_state[prefix + f"{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(ours["clip.visual.transformer.resblocks.2.attn.in_proj_weight"], w)
    a_k = official_state[prefix + "k_proj.lora_A.default.weight"]
    b_v = official_state[prefix + "v_proj.lora_B.default.weight"]
    assert torch.equal(ours["clip.visual.transformer.resblocks.2.attn.lora_in.lora_A"][32:64], a_k)
    assert torch.equal(ours["clip.visual.transformer.resblocks.2.attn.lora_in.lora_B"][2], b_v)
    bridge = "clip.base_model.model.base_model.model.vision_model.encoder.layers.3.cross_attn."
    assert torch.equal(ours["bridges.3.attn.out_proj.weight"], official_state[bridge + "out_proj.weight"])


def test_unknown_key_is_refused_by_name(official_state, model):
    bad = dict(official_state)
    bad["clip.base_model.model.vision_model.encoder.layers.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="mystery"):
        convert_official_state_dict(bad, model.state_dict())


def test_missing_key_is_refused_by_name(official_state, model):
    bad = {k: v for k, v in official_state.items() if not k.startswith("seg_conv2")}
    with pytest.raises(ValueError, match="seg_head.convs.1.weight"):
        convert_official_state_dict(bad, model.state_dict())


def test_converter_command_writes_a_checkpoint_that_reloads(tmp_path, official_state, model):
    config = json.loads((FIXTURE / "config.json").read_text())
    src = tmp_path / "official.pth"
    torch.save({"model": official_state, "args": argparse.Namespace(**config["hivg_args"])}, src)
    out = tmp_path / "ours.pth"
    assert convert_main([str(src), str(out), "--hf_clip_config", str(FIXTURE / "config.json")]) == 0
    ckpt = read_weights(out).checkpoint
    assert ckpt["config"]["hi_lora_mode"] == "official" and ckpt["config"]["hi_lora_stage"] == 1
    assert ckpt["format"] == FORMAT and ckpt["args"]["dataset"] == config["hivg_args"]["dataset"]
    reloaded = load_model(out, merge=False)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_checkpoint_with_a_foreign_key_is_refused(tmp_path, model):
    path = tmp_path / "foreign.pth"
    foreign = model_file(model, {})
    foreign["model"]["extra.weight"] = torch.zeros(1)
    save_checkpoint(path, foreign)
    with pytest.raises(ValueError, match="extra.weight"):
        load_model(path)


def authors_files(folder):
    """The fixture's weights as the authors' format without its flags ({"model": state}, as the fixture holds
    them) and with its flags but without its CLIP, none of our --model configs (a 32-wide tiny CLIP)."""
    state = torch.load(FIXTURE / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    flags = json.loads((FIXTURE / "config.json").read_text())["hivg_args"]
    bare, flagged = folder / "bare.pth", folder / "flagged.pth"
    torch.save({"model": state}, bare)
    torch.save({"model": state, "args": argparse.Namespace(**flags)}, flagged)
    return bare, flagged


def test_authors_checkpoint_without_flags_or_clip_config_says_what_was_found_and_what_to_add(tmp_path, capsys):
    from eval import main as eval_main
    from predict import main as predict_main
    from train_hivg import resolve_args

    bare, flagged = authors_files(tmp_path)
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 24)).save(image)
    tools = (("eval.py", eval_main, "--eval_model", []),
             ("predict.py", predict_main, "--checkpoint", ["--image", str(image), "--text", "x"]))
    for prog, main, flag, extra in tools:
        assert main([flag, str(bare), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{prog}: error: {flag} {bare} holds an authors' HiVG model (795 tensors) but not "
                              "the flags of its training run ('args')") and err.count("\n") == 1, err
        assert "ckpt['args'] = " in err and "--hf_clip_config" in err and "CLIP weights" not in err
        assert main([flag, str(flagged), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{prog}: error: {flag} {flagged}: the authors' flags stored in it give a fusion "
                              "width (vl_hidden_dim) of 32, but the CLIP of its --model ViT-B-16 is 512 wide") and \
            "with --hf_clip_config" in err and "omit the flag" not in err, err
    with pytest.raises(ValueError, match=r"--retrain .*bare\.pth holds an authors' HiVG model"):
        resolve_args(["--retrain", str(bare)])
    with pytest.raises(ValueError, match=r"--retrain .*flagged\.pth: the authors' flags .* --hf_clip_config"):
        resolve_args(["--retrain", str(flagged)])


def test_our_model_state_without_its_config_says_what_is_missing(tmp_path, tiny):
    """{'model': state} of this project's model, the config dropped: named as such, not as 'no CLIP weights'."""
    path = tmp_path / "model_only.pth"
    torch.save({"model": tiny[1].state_dict()}, path)
    with pytest.raises(ValueError, match=r"model_only\.pth holds a 'model' state dict \(\d+ tensors\) but neither "
                                         r"the 'config' .* nor the authors' training flags"):
        load_model(path)
