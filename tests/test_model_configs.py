"""Model configs: every JSON file builds with the README's parameter counts, one name per knob from the JSON
file to the module, the flags' one translation table, and the stems a config starts a random CLIP with."""
import argparse
import inspect
import json
import re
from dataclasses import fields

import pytest
import torch

from models.config import HiVGConfig
from models.configs import CONFIG_DIR, list_models, load_model_config
from models.flags import FLAG_TO_CONFIG, add_model_args, build_config, default_config
from models.fusion import FusionEncoder
from models.hivg import HiVG, build_model
from models.lora import LoRA, merge_lora, merge_lora_state_dict
from models.random_init import dct_axis_counts, init_sincos_position_embedding
from tests.conftest import REPO

FIELDS = {f.name for f in fields(HiVGConfig)}


def flags(*argv):
    return add_model_args(argparse.ArgumentParser()).parse_args(list(argv))


def write_model_file(tmp_path, base="tiny", **entries):
    path = tmp_path / "edited.json"
    path.write_text(json.dumps({**json.loads((CONFIG_DIR / f"{base}.json").read_text()), **entries}))
    return path


def readme_param_table():
    """{config name: (all params at stages 0 and 3, trainable at stages 0-3)} as README.md's Models table
    writes them (millions, as text)."""
    rows = {}
    for line in (REPO / "README.md").read_text().split("## Models", 1)[1].splitlines():
        match = re.match(r"\| `(?!--)([^`]+)`[^|]*\|(?:[^|]*\|){3}([^|]*)\|([^|]*)\|", line)
        if match:
            rows[load_model_config(match[1])["name"]] = (re.findall(r"[\d.]+", match[2]),
                                                         re.findall(r"[\d.]+", match[3]))
    return rows


def param_counts(name, **changes):
    """(all, trainable) parameters of a model built on the meta device: no memory, no time."""
    with torch.device("meta"):
        model = HiVG(default_config(name, **changes))
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)


def millions(count, like):
    """`count` in millions, with as many decimals as the README's `like`."""
    return f"{count / 1e6:.{len(like.partition('.')[2])}f}"


@pytest.mark.parametrize("name", list_models())
def test_every_model_config_builds_with_the_parameter_counts_of_the_readme(name):
    table = readme_param_table()
    assert name in table, f"README.md's Models table has no row for models/configs/{name}.json"
    all_params, trainable = table[name]
    assert len(all_params) == 2 and len(trainable) == 4, table[name]
    counts = [param_counts(name, hi_lora_stage=stage) for stage in range(4)]
    assert [millions(counts[s][0], text) for s, text in zip((0, 3), all_params)] == all_params
    assert [millions(c[1], text) for c, text in zip(counts, trainable)] == trainable


def test_official_mode_counts_of_the_readme():
    text = (REPO / "README.md").read_text()
    match = re.search(r"`--hi_lora_mode official`\s+B/16 has ([\d.]+) M parameters.*?trains\s+"
                      r"([\d.]+) / ([\d.]+) / ([\d.]+) / ([\d.]+) M", text, re.S)
    assert match, "README.md no longer gives the official-mode counts of B/16"
    counts = [param_counts("ViT-B/16", hi_lora_stage=stage, hi_lora_mode="official") for stage in range(4)]
    assert millions(counts[0][0], match[1]) == match[1]
    assert [millions(c[1], t) for c, t in zip(counts, match.groups()[1:])] == list(match.groups()[1:])


def test_a_new_field_reaches_the_module_from_a_json_file_with_no_other_edit(tmp_path):
    path = write_model_file(tmp_path, lora_rank=4, lora_alpha=8)
    model = build_model(flags("--model", str(path), "--imsize", "64", "--hi_lora_stage", "1"))
    assert (model.config.lora_rank, model.config.lora_alpha) == (4, 8)
    adapters = [m for m in model.modules() if isinstance(m, LoRA)]
    assert adapters and all(a.rank == 4 and a.scale == 2.0 for a in adapters)
    assert all(a.lora_A.shape[0] == 4 * a.groups and a.lora_B.shape[-1] == 4 for a in adapters)


def test_merging_a_state_dict_scales_by_the_configs_alpha():
    model = HiVG(default_config("tiny", image_size=64, hi_lora_stage=1, lora_rank=4, lora_alpha=8)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    merged = merge_lora_state_dict(model.state_dict(), alpha=8)
    merge_lora(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6)


def test_a_stored_config_without_the_lora_fields_gets_the_papers_values():
    stored = default_config("tiny").to_dict()
    del stored["lora_rank"], stored["lora_alpha"]
    config = HiVGConfig.from_dict(stored)
    assert (config.lora_rank, config.lora_alpha, config.lora_dropout) == (32, 16, 0.1)


def test_build_config_translates_every_flag_through_the_one_table():
    args = flags("--model", "tiny", "--imsize", "96", "--max_query_len", "16", "--mixup_pretrain",
                 "--bridge_attention", "official", "--vl_nheads", "4", "--vl_enc_layers", "2",
                 "--vl_dim_feedforward", "64", "--vl_dropout", "0.2", "--no-normalize_before",
                 "--hi_lora_stage", "2", "--hi_lora_mode", "official")
    config = build_config(args)
    default = HiVGConfig(clip={}, bridge_layers=[], extract_layers=[], text_layers=[])
    for flag, field in FLAG_TO_CONFIG.items():
        assert getattr(config, field) == getattr(args, flag) != getattr(default, field), flag
    assert set(FLAG_TO_CONFIG.values()) <= FIELDS
    assert (config.adaptive_weights, config.text_layers) == (False, [])
    with pytest.raises(ValueError, match="--vl_hidden_dim 512 must equal the CLIP embedding width 32 of --model tiny"):
        build_config(flags("--model", "tiny", "--vl_hidden_dim", "512"))
    with pytest.raises(ValueError, match="unknown --model 'ViT-X/99'"):
        build_config(flags("--model", "ViT-X/99"))


def test_fusion_encoder_takes_the_configs_names():
    assert set(inspect.signature(FusionEncoder).parameters) - {"width"} <= FIELDS
    model = HiVG(default_config("tiny", image_size=64, fusion_heads=2, fusion_layers=3, fusion_ffn=48))
    layer = model.fusion.layers[0]
    assert (len(model.fusion.layers), layer.linear1.out_features, layer.self_attn.num_heads) == (3, 48, 2)


@pytest.mark.parametrize("entry,message", [("vision_pos_embed_scale", "entry 'vision_pos_embed_scale' is now "
                                                                      "spelled 'pos_embed_scale'"),
                                           ("bridge_layer", "unknown entry 'bridge_layer'")])
def test_a_model_file_entry_that_is_no_field_is_refused_naming_file_and_entry(tmp_path, entry, message):
    path = write_model_file(tmp_path, **{entry: 3})
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        load_model_config(str(path))


def test_a_model_file_without_its_layer_choices_is_refused(tmp_path):
    path = tmp_path / "no_layers.json"
    path.write_text(json.dumps({"open_clip_model": "ViT-B-16", "bridge_layers": [0]}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: no extract_layers: list the 0-based vision blocks")):
        load_model_config(str(path))


def test_a_model_file_may_not_set_what_a_flag_sets(tmp_path):
    path = write_model_file(tmp_path, fusion_heads=4)
    with pytest.raises(ValueError, match=r"entries \['fusion_heads'\] are set by command-line flags"):
        default_config(str(path))


@pytest.mark.parametrize("name", list_models())
def test_every_registered_config_resolves(name):
    cfg = load_model_config(name)
    layers = cfg["clip"]["vision_cfg"]["layers"]
    assert all(0 <= i < layers for i in cfg["bridge_layers"] + cfg["extract_layers"])
    assert cfg["clip"]["quick_gelu"] is True


def test_sincos_position_init_follows_temperature_and_scale_of_the_config():
    """The demo config's table: entry (y, x, k) is sin / cos of y or x times 1 / T^(k / (d/4)), at `scale`
    times the patch embedding's output std; the JSON keys reach the model built from it."""
    model = HiVG(default_config("demo", image_size=64, context_length=16))
    visual, cfg = model.clip.visual, load_model_config("demo")
    T, scale = cfg["pos_embed_temperature"], cfg["pos_embed_scale"]
    assert (T, scale) == (model.config.pos_embed_temperature, model.config.pos_embed_scale) != (10000.0, 1.0)
    pos = visual.positional_embedding.detach().double()
    g, d = 8, pos.shape[1]
    omega = 1.0 / T ** (torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    n = torch.arange(g * g, dtype=torch.float64)
    y, x = n // g, n % g
    expected = torch.cat([torch.sin(y[:, None] * omega), torch.cos(y[:, None] * omega),
                          torch.sin(x[:, None] * omega), torch.cos(x[:, None] * omega)], 1)
    w = visual.conv1.weight.double()
    expected = expected / expected.std() * w.std() * w[0].numel() ** 0.5 * scale
    torch.testing.assert_close(pos[1:], expected, rtol=1e-5, atol=1e-6)
    assert pos[0].abs().max() == 0
    init_sincos_position_embedding(visual)                              # the defaults give another table
    assert not torch.allclose(visual.positional_embedding.double()[1:], expected, atol=1e-3)


def test_dct_patch_init_keeps_the_scale_and_separates_brightness_colour_and_outline():
    """The demo config's patch projection: orthogonal rows of equal norm (the random init's total norm);
    a flat grey patch excites only the luminance DC row, a flat red-minus-green patch only the red-green
    DC row, and a patch with an edge only luminance rows."""
    model = HiVG(default_config("demo", image_size=64, context_length=16))
    assert model.config.patch_embed_init == load_model_config("demo")["patch_embed_init"] == "dct"
    w = model.clip.visual.conv1.weight.detach().double()               # [64, 3, 8, 8]
    d = w.shape[0]
    rows = w.flatten(1)
    norm = rows[0].norm()
    torch.testing.assert_close(rows @ rows.T, torch.eye(d, dtype=torch.float64) * norm ** 2, rtol=0, atol=1e-6)

    def response(patch):
        return torch.einsum("dchw,chw->d", w, patch)
    grey, red_green = torch.ones(3, 8, 8, dtype=torch.float64), torch.zeros(3, 8, 8, dtype=torch.float64)
    red_green[0], red_green[1] = 1, -1
    edge = torch.zeros(3, 8, 8, dtype=torch.float64)
    edge[:, :, 4:] = 1
    luma, colour, _ = dct_axis_counts(d)
    for patch, only in ((grey, [0]), (red_green, [luma])):
        r = response(patch)
        assert r[only].abs().min() > 1 and r[[i for i in range(d) if i not in only]].abs().max() < 1e-9
    r = response(edge)
    assert r[1:luma].abs().max() > 1 and r[luma:].abs().max() < 1e-9
    assert r[luma:luma + colour].abs().max() < 1e-9


def test_unknown_stem_init_in_a_model_config_is_refused(tmp_path):
    path = write_model_file(tmp_path, base="demo", patch_embed_init="dtc")
    with pytest.raises(ValueError, match=r"patch_embed_init 'dtc' is not one of \['open_clip', 'dct'\]"):
        default_config(str(path), image_size=64)
