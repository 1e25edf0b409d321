"""Convert the authors' HiVG checkpoints (HF-CLIP + peft names) to this project's names (docs/method.md, section 8).

Official keys look like `clip.base_model.model.base_model.model.vision_model.encoder.layers.0.self_attn.
q_proj.lora_A.default.weight` (one `base_model.model.` per nested peft wrap, `.base_layer` with newer
peft). Every key is either mapped or on an explicit ignore list; anything else is an error naming it.

The command `python -m utils.checkpoint OFFICIAL.pth OUT.pth` writes the converted checkpoint.
"""
import re
from typing import Callable, Dict, Optional, Tuple

import torch

from .config import HiVGConfig
from .convert_clip import hf_key_to_open_clip
from .flags import config_from_flags
from .lora import OFFICIAL_ALPHA, OFFICIAL_RANK

PEFT_PREFIX = re.compile(r"(base_model\.model\.)+")
QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}

# Parameters the official model creates but never uses in its forward.
IGNORED = (re.compile(r"(^|\.)position_ids$"), re.compile(r"^condition_text_pos_embed\."),
           re.compile(r"^ml_text_feat_perceiver\."), re.compile(r"^reg_pos_embed\."))
# Used only by some variants: ignored when the target model has no such parameter.
VARIANT_ONLY = (re.compile(r"^condition_text_proj\."), re.compile(r"\.cross_gate\."),
                re.compile(r"\.cross_adaptive_weights\."))

HEAD_RULES = (
    (r"^visu_proj\.", "visual_proj."), (r"^text_proj\.", "text_proj."), (r"^reg_token\.", "reg_token."),
    (r"^vl_pos_embed\.", "pos_embed."), (r"^ml_visual_projection\.", "visual_proj_multi."),
    (r"^bbox_embed\.", "box_head."), (r"^visu_token_norm\.", "token_align.norm."),
    (r"^visu_token_mlp\.", "token_align."), (r"^condition_text_proj\.", "mixup_text_proj."),
    (r"^vl_transformer\.encoder\.", "fusion."),
)
SEG_CONV = re.compile(r"^seg_conv([123])\.weight$")
BRIDGE = re.compile(r"^clip\.vision_model\.encoder\.layers\.(\d+)\.cross_(\w+?)\.(.*)$")
BRIDGE_PARTS = {"norm": "norm", "mlp": "mlp", "gate": "text_gate"}
LORA = re.compile(r"^(.*)\.(q_proj|k_proj|v_proj|out_proj)\.lora_([AB])\.default\.weight$")


def canonical_key(key: str) -> str:
    """Strip peft's wrapper prefixes and `.base_layer` (newer peft) from an official key."""
    return PEFT_PREFIX.sub("", key).replace(".base_layer.", ".")


def _proj_target(module_path: str, proj: str) -> Tuple[str, Optional[int]]:
    """Official attention projection -> (our host path, q/k/v slot or None for out_proj)."""
    m = BRIDGE.match(f"{module_path}.{proj}.weight")
    if m and m.group(2) == "attn":
        host = f"bridges.{m.group(1)}.attn"
    else:
        new_key, _, _ = hf_key_to_open_clip(f"{module_path}.{proj}.weight".removeprefix("clip."))
        host = "clip." + new_key.rsplit(".", 1)[0]
        if proj == "out_proj":
            host = host.removesuffix(".out_proj")
    return host, QKV.get(proj)


def map_key(key: str) -> Tuple[Optional[str], Optional[int], bool]:
    """Canonical official key -> (our key or None if ignored, fused slot or None, transpose)."""
    if any(p.search(key) for p in IGNORED):
        return None, None, False
    m = LORA.match(key)
    if m:
        host, slot = _proj_target(m.group(1), m.group(2))
        kind = "lora_out" if slot is None else "lora_in"
        return f"{host}.{kind}.lora_{m.group(3)}", slot, False
    m = BRIDGE.match(key)
    if m:
        layer, part, rest = m.groups()
        if part == "attn":
            proj, leaf = rest.split(".")
            if proj in QKV:
                return f"bridges.{layer}.attn.in_proj_{leaf}", QKV[proj], False
            return f"bridges.{layer}.attn.{rest}", None, False
        if part == "adaptive_weights":
            return f"bridges.{layer}.adaptive_weights.{rest.split('.')[0]}", None, False
        if part in BRIDGE_PARTS:
            return f"bridges.{layer}.{BRIDGE_PARTS[part]}.{rest}", None, False
        raise KeyError(key)
    if key.startswith("clip."):
        new_key, slot, transpose = hf_key_to_open_clip(key.removeprefix("clip."))
        return "clip." + new_key, slot, transpose
    m = SEG_CONV.match(key)
    if m:
        return f"seg_head.convs.{int(m.group(1)) - 1}.weight", None, False
    for pattern, repl in HEAD_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key), None, False
    raise KeyError(key)


def convert_official_state_dict(official: Dict[str, torch.Tensor],
                                expected: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Official HiVG (or debiased CLIP, keys without `clip.` get it added) state dict -> ours.

    `expected` (our model's state_dict) turns on the strict check: variant-only official keys absent
    from it are dropped, and every converted key must exist there with the same shape, and vice versa.
    """
    slots: Dict[str, Dict[int, torch.Tensor]] = {}
    out: Dict[str, torch.Tensor] = {}
    for raw_key, value in official.items():
        key = canonical_key(raw_key)
        if not key.startswith("clip.") and key.split(".")[0] in ("text_model", "vision_model", "logit_scale",
                                                                 "text_projection", "visual_projection"):
            key = "clip." + key
        try:
            new_key, slot, transpose = map_key(key)
        except KeyError:
            raise KeyError(f"official checkpoint key {raw_key!r} has no mapping and is not on the ignore list; "
                           "this is not a HiVG checkpoint of a known layout") from None
        if new_key is None:
            continue
        if expected is not None and new_key not in expected and any(p.search(key) for p in VARIANT_ONLY):
            continue
        value = value.t() if transpose else value
        if slot is None:
            out[new_key] = value.contiguous()
        else:
            slots.setdefault(new_key, {})[slot] = value
    for new_key, parts in slots.items():
        if sorted(parts) != [0, 1, 2]:
            raise KeyError(f"{new_key}: expected q, k and v entries, found slots {sorted(parts)}")
        join = torch.stack if new_key.endswith(".lora_B") else torch.cat
        out[new_key] = join([parts[i] for i in range(3)], dim=0)
    for key in [k for k in out if k.endswith(".lora_B") and out[k].dim() == 2]:
        out[key] = out[key][None]  # an out_proj adapter is one group
    for key in [k for k in out if k.endswith(".lora_A") and k.replace(".lora_A", ".lora_B") in out]:
        r = out[key].shape[0] // out[key.replace(".lora_A", ".lora_B")].shape[0]
        if r != OFFICIAL_RANK:
            raise ValueError(f"{key}: LoRA rank {r}, the authors' adapters have rank {OFFICIAL_RANK} "
                             f"(alpha {OFFICIAL_ALPHA})")
    if expected is not None:
        check_state_dict(out, expected)
    return out


def _first(keys, n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def key_mismatch(state: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor],
                 may_lack: Callable[[str], bool] = lambda key: False) -> str:
    """'' when `state` fits `expected` (keys `may_lack` accepts may be absent), else one line naming the
    first few missing, unexpected and mis-shaped keys."""
    missing = sorted(k for k in set(expected) - set(state) if not may_lack(k))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    parts = [f"missing {_first(missing)}" if missing else "", f"unexpected {_first(unexpected)}" if unexpected else "",
             "shape mismatch " + _first([f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong])
             if wrong else ""]
    return "; ".join(p for p in parts if p)


def check_state_dict(state: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor],
                     what: str = "checkpoint") -> None:
    """Strict key and shape agreement, with one error that names the offending keys."""
    mismatch = key_mismatch(state, expected)
    if mismatch:
        raise ValueError(f"{what} does not match the model its own config describes (the file was edited or "
                         f"mixed up with another model's): {mismatch}")


def official_config(official: dict, clip_cfg: Optional[dict] = None, **overrides) -> HiVGConfig:
    """The config of an authors' checkpoint from its argparse values (as a dict): their flags where they
    name the same thing, and the official Hi LoRA layout and bridge attention their weights need."""
    flags = dict(official, hi_lora_mode="official", bridge_attention="official")
    flags.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_flags(flags, clip_cfg)
