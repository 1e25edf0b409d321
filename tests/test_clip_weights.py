"""Loading CLIP weights into HiVG (--clip_model) from files the test writes: open_clip, HF and the
authors' debiased CLIP (peft names with LoRA)."""
import pytest
import torch
from safetensors.torch import save_file

from models.backbone import build_clip
from models.flags import default_config
from models.hivg import HiVG
from models.weights import load_clip, read_weights
from tests.clip_helpers import open_clip_to_hf


def tiny(mode="paper"):
    return HiVG(default_config("tiny", image_size=64, fusion_ffn=64, hi_lora_mode=mode))


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(123)
    return tiny().config.clip, build_clip(tiny().config.clip).state_dict()


def load_clip_weights(model, path):
    load_clip(model, read_weights(path, what="--clip_model"))


def assert_clip_equals(model, state):
    ours = model.clip.state_dict()
    for key, value in state.items():
        if key in ours:
            assert torch.equal(ours[key], value), key
    proj_t = state["visual.proj"].t()
    assert torch.equal(model.visual_proj_multi.weight, torch.cat([proj_t] * len(model.extract_layers), dim=1))


def test_open_clip_file(tmp_path, source):
    _, state = source
    path = tmp_path / "open_clip.pth"
    torch.save(state, path)
    model = tiny()
    load_clip_weights(model, path)
    assert_clip_equals(model, state)


def test_hf_safetensors_file(tmp_path, source):
    _, state = source
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip_to_hf(state).items()}, str(path))
    model = tiny()
    load_clip_weights(model, path)
    assert_clip_equals(model, state)


def debiased_file(tmp_path, state):
    """The authors' debiased CLIP layout: {'model': peft-wrapped HF names}, LoRA on the q/k/v/out projections
    of text layer 0 (only q's update is non-zero)."""
    hf = {f"base_model.model.{k}": v for k, v in open_clip_to_hf(state).items()}
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(32, 48, generator=g), torch.randn(48, 32, generator=g)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        prefix = f"base_model.model.text_model.encoder.layers.0.self_attn.{proj}"
        hf[f"{prefix}.lora_A.default.weight"] = a if proj == "q_proj" else torch.randn(32, 48, generator=g)
        hf[f"{prefix}.lora_B.default.weight"] = b if proj == "q_proj" else torch.zeros(48, 32)
    path = tmp_path / "debiased.pth"
    torch.save({"model": hf}, path)
    return path, a, b


def test_debiased_clip_lora_is_merged_in_paper_mode(tmp_path, source):
    _, state = source
    path, a, b = debiased_file(tmp_path, state)
    model = tiny("paper")
    load_clip_weights(model, path)
    w = model.clip.transformer.resblocks[0].attn.in_proj_weight
    torch.testing.assert_close(w[:48], state["transformer.resblocks.0.attn.in_proj_weight"][:48] + 0.5 * b @ a)
    assert torch.equal(w[48:], state["transformer.resblocks.0.attn.in_proj_weight"][48:])


def test_debiased_clip_lora_is_kept_in_official_mode(tmp_path, source):
    _, state = source
    path, a, b = debiased_file(tmp_path, state)
    model = tiny("official")
    load_clip_weights(model, path)
    lora = model.clip.transformer.resblocks[0].attn.lora_in
    assert torch.equal(lora.lora_A[:32], a) and torch.equal(lora.lora_B[0], b)
    assert torch.equal(model.clip.transformer.resblocks[0].attn.in_proj_weight,
                       state["transformer.resblocks.0.attn.in_proj_weight"])


def test_missing_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="--clip_model"):
        load_clip_weights(tiny(), tmp_path / "nope.pth")
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises((KeyError, ValueError)):
        load_clip_weights(tiny(), path)
