import json
import re

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from models.convert_clip import hf_config_to_open_clip_cfg, hf_key_to_open_clip, hf_to_open_clip
from models.weights import read_weights
from tests.clip_helpers import open_clip_to_hf
from tests.conftest import FIXTURES
from tests.tolerance import assert_close_fp32

FIXTURE = FIXTURES / "hivg_tiny_unc_stage1"
LORA_SCALE = 16 / 32  # alpha / r of the fixture's LoRA


@pytest.fixture(scope="module")
def hf_config():
    return json.loads((FIXTURE / "config.json").read_text())["clip_config"]


@pytest.fixture(scope="module")
def clip_cfg(hf_config):
    return hf_config_to_open_clip_cfg(hf_config)


@pytest.fixture(scope="module")
def tiny_clip(clip_cfg):
    torch.manual_seed(0)
    return open_clip.model.CLIP(**clip_cfg).eval()


@pytest.fixture(scope="module")
def fixture_clip_raw():
    """Canonical HF names -> tensors of the fixture checkpoint's CLIP part (LoRA and bridge keys included)."""
    model = torch.load(FIXTURE / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    return {re.sub(r"(base_model\.model\.)+", "", key)[len("clip."):]: value
            for key, value in model.items() if key.startswith("clip.")}


def plain_clip_keys(raw):
    """Drop peft LoRA factors and the HiVG bridge modules (cross_*), keeping the CLIP itself."""
    return {key: value for key, value in raw.items() if "lora_" not in key and ".cross_" not in key}


def assert_same_tensors(actual, expected):
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


def test_config_of_fixture(clip_cfg):
    assert clip_cfg == {
        "embed_dim": 32,
        "vision_cfg": {"width": 64, "layers": 12, "head_width": 16, "mlp_ratio": 2.0,
                       "patch_size": 16, "image_size": 64},
        "text_cfg": {"width": 48, "heads": 4, "layers": 12, "mlp_ratio": 2.0,
                     "context_length": 77, "vocab_size": 49408},
        "quick_gelu": True,
    }


def with_tower_values(hf_config, tower, **values):
    config = json.loads(json.dumps(hf_config))
    config[tower].update(values)
    return config


def test_config_variants(hf_config):
    gelu = with_tower_values(with_tower_values(hf_config, "text_config", hidden_act="gelu"),
                             "vision_config", hidden_act="gelu")
    assert hf_config_to_open_clip_cfg(gelu)["quick_gelu"] is False
    eps = hf_config_to_open_clip_cfg(with_tower_values(hf_config, "vision_config", layer_norm_eps=1e-6))
    assert eps["vision_cfg"]["norm_kwargs"] == {"eps": 1e-6}
    assert "norm_kwargs" not in eps["text_cfg"]


@pytest.mark.parametrize("tower, values, message", [
    ("vision_config", {"num_attention_heads": 5}, "vision head width"),
    ("text_config", {"num_attention_heads": 5}, "text head width"),
    ("text_config", {"hidden_act": "gelu_new"}, "activation"),
    ("vision_config", {"hidden_act": "gelu"}, "activation"),
    ("vision_config", {"num_channels": 1}, "num_channels"),
])
def test_config_errors(hf_config, tower, values, message):
    with pytest.raises(ValueError, match=message):
        hf_config_to_open_clip_cfg(with_tower_values(hf_config, tower, **values))


def test_config_missing_field(hf_config):
    config = json.loads(json.dumps(hf_config))
    del config["text_config"]["vocab_size"]
    with pytest.raises(ValueError, match="vocab_size"):
        hf_config_to_open_clip_cfg(config)


@pytest.mark.parametrize("key, expected", [
    ("logit_scale", ("logit_scale", None, False)),
    ("text_model.embeddings.token_embedding.weight", ("token_embedding.weight", None, False)),
    ("text_model.embeddings.position_embedding.weight", ("positional_embedding", None, False)),
    ("text_model.final_layer_norm.bias", ("ln_final.bias", None, False)),
    ("text_projection.weight", ("text_projection", None, True)),
    ("visual_projection.weight", ("visual.proj", None, True)),
    ("vision_model.embeddings.class_embedding", ("visual.class_embedding", None, False)),
    ("vision_model.embeddings.patch_embedding.weight", ("visual.conv1.weight", None, False)),
    ("vision_model.embeddings.position_embedding.weight", ("visual.positional_embedding", None, False)),
    ("vision_model.pre_layrnorm.weight", ("visual.ln_pre.weight", None, False)),
    ("vision_model.post_layernorm.bias", ("visual.ln_post.bias", None, False)),
    ("text_model.encoder.layers.3.self_attn.q_proj.weight",
     ("transformer.resblocks.3.attn.in_proj_weight", 0, False)),
    ("text_model.encoder.layers.3.self_attn.k_proj.bias", ("transformer.resblocks.3.attn.in_proj_bias", 1, False)),
    ("vision_model.encoder.layers.11.self_attn.v_proj.weight",
     ("visual.transformer.resblocks.11.attn.in_proj_weight", 2, False)),
    ("vision_model.encoder.layers.0.self_attn.out_proj.weight",
     ("visual.transformer.resblocks.0.attn.out_proj.weight", None, False)),
    ("vision_model.encoder.layers.2.layer_norm1.weight", ("visual.transformer.resblocks.2.ln_1.weight", None, False)),
    ("text_model.encoder.layers.2.layer_norm2.bias", ("transformer.resblocks.2.ln_2.bias", None, False)),
    ("text_model.encoder.layers.7.mlp.fc1.weight", ("transformer.resblocks.7.mlp.c_fc.weight", None, False)),
    ("vision_model.encoder.layers.7.mlp.fc2.bias", ("visual.transformer.resblocks.7.mlp.c_proj.bias", None, False)),
    ("text_model.embeddings.position_ids", (None, None, False)),
    ("vision_model.embeddings.position_ids", (None, None, False)),
])
def test_key_mapping(key, expected):
    assert hf_key_to_open_clip(key) == expected


@pytest.mark.parametrize("key", [
    "vision_model.encoder.layers.0.cross_attn.q_proj.weight",
    "text_model.encoder.layers.0.self_attn.q_proj.lora_A.default.weight",
    "clip.logit_scale",
    "vision_model.encoder.layers.x.mlp.fc1.weight",
    "text_projection.bias",
])
def test_unknown_keys_raise(key):
    with pytest.raises(KeyError, match=re.escape(key)):
        hf_key_to_open_clip(key)
    with pytest.raises(ValueError, match=re.escape(key)):
        hf_to_open_clip({key: torch.zeros(1)})


def test_incomplete_qkv_raises():
    state = {"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4),
             "text_model.encoder.layers.0.self_attn.v_proj.weight": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match="the k projection is missing"):
        hf_to_open_clip(state)


def test_open_clip_round_trip_is_exact_and_strict(tiny_clip, clip_cfg):
    reference = tiny_clip.state_dict()
    assert "attn_mask" not in reference  # non-persistent buffer
    hf = open_clip_to_hf(reference)
    assert not any(key.startswith(("visual.", "transformer.")) for key in hf)
    assert_same_tensors(hf_to_open_clip(hf), reference)
    fresh = open_clip.model.CLIP(**clip_cfg)
    fresh.load_state_dict(hf_to_open_clip(hf), strict=True)


def test_open_clip_to_hf_layout(tiny_clip):
    reference = tiny_clip.state_dict()
    hf = open_clip_to_hf(reference)
    in_proj = reference["transformer.resblocks.5.attn.in_proj_weight"]
    for slot, name in enumerate("qkv"):
        torch.testing.assert_close(hf[f"text_model.encoder.layers.5.self_attn.{name}_proj.weight"],
                                   in_proj[48 * slot:48 * (slot + 1)], rtol=0, atol=0)
    assert hf["visual_projection.weight"].shape == (32, 64)
    assert hf["text_projection.weight"].shape == (32, 48)
    with pytest.raises(ValueError, match="attn_mask"):
        open_clip_to_hf({"attn_mask": torch.zeros(2, 2)})


def test_fixture_checkpoint_converts_and_loads_strictly(fixture_clip_raw, clip_cfg):
    hf = plain_clip_keys(fixture_clip_raw)
    converted = hf_to_open_clip(hf)
    model = open_clip.model.CLIP(**clip_cfg)
    model.load_state_dict(converted, strict=True)
    state = model.state_dict()
    for slot, name in enumerate("qkv"):
        torch.testing.assert_close(
            state["visual.transformer.resblocks.4.attn.in_proj_bias"][64 * slot:64 * (slot + 1)],
            hf[f"vision_model.encoder.layers.4.self_attn.{name}_proj.bias"], rtol=0, atol=0)
    torch.testing.assert_close(state["text_projection"], hf["text_projection.weight"].t(), rtol=0, atol=0)
    torch.testing.assert_close(state["visual.proj"], hf["visual_projection.weight"].t(), rtol=0, atol=0)


def test_sub_tree_converts_key_by_key(fixture_clip_raw):
    vision = {key: value for key, value in plain_clip_keys(fixture_clip_raw).items()
              if key.startswith("vision_model.")}
    converted = hf_to_open_clip(vision)
    assert converted and all(key.startswith("visual.") for key in converted)
    assert len(converted) == len(vision) - 1 - 12 * 4  # position_ids dropped, q/k/v weight+bias fused


def merged_text_tower(raw):
    """HF text-tower weights with the fixture's LoRA merged: W + scale * B @ A."""
    text = {key: value for key, value in plain_clip_keys(raw).items() if not key.startswith("vision_model.")}
    for key in text:
        base = key.removesuffix(".weight")
        if key.startswith("text_model.") and f"{base}.lora_A.default.weight" in raw:
            lora_a, lora_b = raw[f"{base}.lora_A.default.weight"], raw[f"{base}.lora_B.default.weight"]
            text[key] = text[key] + LORA_SCALE * lora_b @ lora_a
    return text


@pytest.mark.recorded
def test_converted_text_tower_reproduces_official_features(fixture_clip_raw, clip_cfg):
    """The official text encoder (no bridge inside) equals open_clip's on the converted weights."""
    model = open_clip.model.CLIP(**clip_cfg).eval()
    missing, unexpected = model.load_state_dict(hf_to_open_clip(merged_text_tower(fixture_clip_raw)), strict=False)
    assert not unexpected and all(key.startswith("visual.") for key in missing)
    inputs = torch.load(FIXTURE / "inputs.pth", map_location="cpu", weights_only=True)
    expected = torch.load(FIXTURE / "outputs.pth", map_location="cpu", weights_only=True)["intermediates"]
    tokens = inputs["text_tokens"].long()
    with torch.no_grad():
        x = model.token_embedding(tokens) + model.positional_embedding
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    depth = clip_cfg["text_cfg"]["layers"] + 1                          # the blocks and ln_final
    assert_close_fp32(x, expected["text_last_hidden_state"], depth=depth, name="text_last_hidden_state")
    pooled = x[torch.arange(len(tokens)), tokens.argmax(dim=-1)]
    assert_close_fp32(pooled, expected["text_pooler_output"], depth=depth, name="text_pooler_output")


def test_load_hf_bin_and_safetensors(tmp_path, tiny_clip):
    reference = tiny_clip.state_dict()
    hf = {key: value.contiguous() for key, value in open_clip_to_hf(reference).items()}
    hf["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(hf, tmp_path / "pytorch_model.bin")
    save_file(hf, str(tmp_path / "model.safetensors"))
    for name in ("pytorch_model.bin", "model.safetensors"):
        assert_same_tensors(read_weights(tmp_path / name).state, reference)


def test_load_open_clip_names_pass_through(tmp_path, tiny_clip, clip_cfg):
    reference = tiny_clip.state_dict()
    torch.save({"module." + key: value for key, value in reference.items()}, tmp_path / "ddp.pt")
    torch.save({"epoch": 3, "state_dict": reference}, tmp_path / "train.pth")
    save_file({key: value.contiguous() for key, value in reference.items()}, str(tmp_path / "oc.safetensors"))
    for name in ("ddp.pt", "train.pth", "oc.safetensors"):
        loaded = read_weights(tmp_path / name).state
        assert_same_tensors(loaded, reference)
        open_clip.model.CLIP(**clip_cfg).load_state_dict(loaded, strict=True)


def scripted_tensor_tree(state_dict):
    """A TorchScript module whose state dict is ``state_dict`` (the layout of OpenAI's JIT archives)."""
    root = nn.Module()
    for key, value in state_dict.items():
        *path, name = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(name, nn.Parameter(value, requires_grad=False))
    root.register_buffer("input_resolution", torch.tensor(32))
    return torch.jit.script(root)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_load_openai_jit_archive(tmp_path):
    # open_clip's OpenAI loader infers 64-wide heads and MLP ratio 4, as in OpenAI's models
    torch.manual_seed(0)
    model = open_clip.model.CLIP(16, {"width": 64, "layers": 2, "head_width": 64, "patch_size": 16, "image_size": 32},
                                 {"width": 64, "heads": 1, "layers": 2, "context_length": 8, "vocab_size": 50},
                                 quick_gelu=True)
    reference = {key: value.half().float() for key, value in model.state_dict().items()}  # fp16 archive values
    scripted_tensor_tree(reference).save(str(tmp_path / "ViT-tiny.pt"))
    loaded = read_weights(tmp_path / "ViT-tiny.pt").state
    assert_same_tensors(loaded, reference)


class NotATensor:
    pass


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        read_weights(tmp_path / "missing.bin")
    (tmp_path / "weights.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights\.ckpt is empty \(0 bytes\)"):
        read_weights(tmp_path / "weights.ckpt")
    torch.save({"backbone.weight": torch.zeros(1)}, tmp_path / "other.bin")
    with pytest.raises(ValueError, match=r"other\.bin: neither HF CLIPModel nor open_clip"):
        read_weights(tmp_path / "other.bin")
    torch.save({"text_model.encoder.layers.0.self_attn.q_proj.lora_A.default.weight": torch.zeros(1),
                "logit_scale": torch.zeros(())}, tmp_path / "peft.bin")
    with pytest.raises(ValueError, match=r"peft\.bin: unexpected key .*lora_A"):
        read_weights(tmp_path / "peft.bin")
    torch.save({"model": NotATensor()}, tmp_path / "pickle.pth")
    with pytest.raises(ValueError, match=r"pickle\.pth holds Python objects besides tensors"):
        read_weights(tmp_path / "pickle.pth")
