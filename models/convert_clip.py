"""Convert CLIP checkpoints to the state-dict names of ``open_clip.model.CLIP`` (docs/method.md, section 8).

HF transformers ``CLIPModel`` names map to open_clip names through one table of rename
rules. A rule is a pair of templates, HF side and open_clip side, in which ``{i}`` stands
for a layer index, ``{p}`` for ``weight``/``bias`` and ``{s}`` for one of ``q``/``k``/``v``.
The tests invert the same table to write HF files (tests/clip_helpers.py). Three kinds of rule exist:

- ``copy``: rename only;
- ``transpose``: rename and transpose (HF stores the projections as Linear weights
  [embed, width], open_clip as matrices [width, embed]);
- ``qkv``: HF's separate q/k/v projections are stacked (order q, k, v) into open_clip's
  ``in_proj_weight`` [3 * width, width] / ``in_proj_bias`` [3 * width].

The conversion is strict: every key is mapped, explicitly dropped (``position_ids``
buffers), or rejected with an error naming it. ``hf_key_to_open_clip`` maps one key at a
time, so checkpoints that hold only part of a CLIP (or CLIP keys among other modules) can
be converted key by key.
"""
import json
import re
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

_FIELDS = {"i": r"\d+", "p": r"weight|bias", "s": r"[qkv]"}
_QKV_SLOTS = {"q": 0, "k": 1, "v": 2}

_GLOBAL_RULES = (
    ("logit_scale", "logit_scale", "copy"),
    ("text_model.embeddings.token_embedding.weight", "token_embedding.weight", "copy"),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding", "copy"),
    ("text_model.final_layer_norm.{p}", "ln_final.{p}", "copy"),
    ("text_projection.weight", "text_projection", "transpose"),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding", "copy"),
    ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight", "copy"),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding", "copy"),
    ("vision_model.pre_layrnorm.{p}", "visual.ln_pre.{p}", "copy"),
    ("vision_model.post_layernorm.{p}", "visual.ln_post.{p}", "copy"),
    ("visual_projection.weight", "visual.proj", "transpose"),
)
_TOWER_PREFIXES = (
    ("text_model.encoder.layers.{i}.", "transformer.resblocks.{i}."),
    ("vision_model.encoder.layers.{i}.", "visual.transformer.resblocks.{i}."),
)
_BLOCK_RULES = (
    ("self_attn.{s}_proj.{p}", "attn.in_proj_{p}", "qkv"),
    ("self_attn.out_proj.{p}", "attn.out_proj.{p}", "copy"),
    ("layer_norm1.{p}", "ln_1.{p}", "copy"),
    ("layer_norm2.{p}", "ln_2.{p}", "copy"),
    ("mlp.fc1.{p}", "mlp.c_fc.{p}", "copy"),
    ("mlp.fc2.{p}", "mlp.c_proj.{p}", "copy"),
)
# HF keys that carry no weights (index buffers) and are deliberately dropped.
HF_DROPPED_KEYS = re.compile(r"(text|vision)_model\.embeddings\.position_ids")
HF_TOWER_PREFIXES = ("text_model.", "vision_model.")


def _compile(template: str) -> re.Pattern:
    """Template with {field} placeholders -> anchored regex with named groups."""
    parts = re.split(r"\{(\w)\}", template)
    regex = "".join(re.escape(part) if n % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})"
                    for n, part in enumerate(parts))
    return re.compile(regex)


def _build_rules() -> list[tuple[re.Pattern, str, re.Pattern, str, str]]:
    """(hf regex, hf template, open_clip regex, open_clip template, kind) for every rule."""
    pairs = list(_GLOBAL_RULES)
    for hf_prefix, oc_prefix in _TOWER_PREFIXES:
        pairs += [(hf_prefix + hf, oc_prefix + oc, kind) for hf, oc, kind in _BLOCK_RULES]
    return [(_compile(hf), hf, _compile(oc), oc, kind) for hf, oc, kind in pairs]


_RULES = _build_rules()


def hf_key_to_open_clip(key: str) -> tuple[Optional[str], Optional[int], bool]:
    """Map one HF CLIPModel state-dict key to its open_clip name.

    Returns:
        (new_key, qkv_slot, transpose): ``qkv_slot`` is 0/1/2 when the tensor is the q/k/v
        part of ``new_key`` (an ``in_proj_weight``/``in_proj_bias`` to be stacked in that
        order), else None; ``transpose`` tells whether the tensor must be transposed.
        ``new_key`` is None for keys that are deliberately dropped (``position_ids``).
    Raises:
        KeyError: the key is not part of an HF CLIPModel.
    """
    if HF_DROPPED_KEYS.fullmatch(key):
        return None, None, False
    for hf_regex, _, _, oc_template, kind in _RULES:
        match = hf_regex.fullmatch(key)
        if match:
            fields = match.groupdict()
            slot = _QKV_SLOTS[fields["s"]] if kind == "qkv" else None
            return oc_template.format(**fields), slot, kind == "transpose"
    raise KeyError(f"not an HF CLIPModel state-dict key: {key!r}")


def hf_to_open_clip(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Convert an HF CLIPModel state dict (whole or any part of it) to open_clip names.

    q/k/v projections of a layer must come together; ``position_ids`` are dropped.
    Raises ValueError naming the first unknown key, or an incomplete q/k/v triple.
    """
    converted: dict[str, Tensor] = {}
    qkv_parts: dict[str, list[Optional[Tensor]]] = {}
    for key, tensor in state_dict.items():
        try:
            new_key, slot, transpose = hf_key_to_open_clip(key)
        except KeyError as err:
            raise ValueError(f"unexpected key {key!r} in HF CLIP state dict") from err
        if new_key is None:
            continue
        if slot is not None:
            qkv_parts.setdefault(new_key, [None, None, None])[slot] = tensor
        else:
            converted[new_key] = tensor.t().contiguous() if transpose else tensor
    for new_key, parts in qkv_parts.items():
        missing = [name for name, slot in _QKV_SLOTS.items() if parts[slot] is None]
        if missing:
            raise ValueError(f"cannot build {new_key!r}: the {'/'.join(missing)} projection is missing")
        converted[new_key] = torch.cat(parts, dim=0)
    return converted


def _positive_int_ratio(numerator: int, denominator: int, what: str) -> int:
    if denominator <= 0 or numerator % denominator:
        raise ValueError(f"open_clip cannot express {what} = {numerator} / {denominator} (not an integer)")
    return numerator // denominator


def _mlp_ratio(sub_config: dict, tower: str) -> float:
    """intermediate_size / hidden_size, checked to give back the same MLP width in open_clip."""
    width, hidden = sub_config["hidden_size"], sub_config["intermediate_size"]
    ratio = hidden / width
    if int(width * ratio) != hidden:
        raise ValueError(f"open_clip cannot express the {tower} MLP width {hidden} as a ratio of {width}")
    return ratio


def _activation_is_quick_gelu(text: dict, vision: dict) -> bool:
    """HF hidden_act of both towers -> open_clip's single quick_gelu flag."""
    acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise ValueError(
            f"open_clip CLIP needs one activation for both towers, 'quick_gelu' or 'gelu'; got {sorted(acts)}"
        )
    return acts == {"quick_gelu"}


def _norm_kwargs(sub_config: dict) -> dict:
    """open_clip tower-config entry for a non-default LayerNorm epsilon (open_clip uses 1e-5)."""
    eps = sub_config.get("layer_norm_eps", 1e-5)
    return {} if eps == 1e-5 else {"norm_kwargs": {"eps": eps}}


def hf_config_to_open_clip_cfg(hf_config: dict) -> dict:
    """Keyword arguments of ``open_clip.model.CLIP`` from an HF ``CLIPConfig.to_dict()``.

    Raises ValueError for settings open_clip cannot express (head counts that do not divide
    the width, MLP widths that are no ratio of it, an activation other than quick_gelu/gelu
    or different activations in the two towers, input channels other than 3).
    """
    try:
        text, vision = hf_config["text_config"], hf_config["vision_config"]
        if vision.get("num_channels", 3) != 3:
            raise ValueError(f"open_clip CLIP takes RGB images; got num_channels = {vision['num_channels']}")
        vision_cfg = {
            "width": vision["hidden_size"],
            "layers": vision["num_hidden_layers"],
            "head_width": _positive_int_ratio(vision["hidden_size"], vision["num_attention_heads"],
                                              "vision head width"),
            "mlp_ratio": _mlp_ratio(vision, "vision"),
            "patch_size": vision["patch_size"],
            "image_size": vision["image_size"],
            **_norm_kwargs(vision),
        }
        _positive_int_ratio(text["hidden_size"], text["num_attention_heads"], "text head width")
        text_cfg = {
            "width": text["hidden_size"],
            "heads": text["num_attention_heads"],
            "layers": text["num_hidden_layers"],
            "mlp_ratio": _mlp_ratio(text, "text"),
            "context_length": text["max_position_embeddings"],
            "vocab_size": text["vocab_size"],
            **_norm_kwargs(text),
        }
        embed_dim = hf_config["projection_dim"]
    except KeyError as err:
        raise ValueError(f"HF CLIP config lacks {err}; pass CLIPConfig.to_dict()") from err
    return {
        "embed_dim": embed_dim,
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
        "quick_gelu": _activation_is_quick_gelu(text, vision),
    }


def clip_cfg_from_hf_json(path) -> dict:
    """open_clip CLIP kwargs from an HF CLIPConfig JSON file (or a fixture config.json holding one)."""
    try:
        config = json.loads(Path(path).read_text())
        return hf_config_to_open_clip_cfg(config.get("clip_config", config))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--hf_clip_config {path} is not a readable HF CLIPConfig JSON ({e})") from None
