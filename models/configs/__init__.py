"""Model variants as data: one JSON file per `--model`, registered by file name.

A config names an open_clip architecture (`open_clip_model`) or carries its kwargs inline (`clip`),
optionally `quick_gelu` (default true) and `warmup_bridge_layers` (bridges used with `--warmup`). Every
other entry is a `HiVGConfig` field under its own name: `bridge_layers`, `extract_layers` (0-based vision
blocks), `token_mlp_width`, `lora_rank`, ...; a config for a random CLIP may set `pos_embed_init`
("sincos"), `pos_embed_temperature`, `pos_embed_scale` and `patch_embed_init` ("dct") (models.random_init).
"""
import copy
import json
from dataclasses import fields
from pathlib import Path
from typing import Dict, List

import open_clip

from ..config import HiVGConfig

CONFIG_DIR = Path(__file__).resolve().parent
FILE_ONLY_KEYS = ("open_clip_model", "clip", "quick_gelu", "warmup_bridge_layers")
REQUIRED_KEYS = ("bridge_layers", "extract_layers")
RENAMED_KEYS = {"vision_pos_embed_init": "pos_embed_init", "vision_pos_embed_temperature": "pos_embed_temperature",
                "vision_pos_embed_scale": "pos_embed_scale", "vision_patch_embed_init": "patch_embed_init"}


def list_models() -> List[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_model_config(name: str) -> Dict:
    """`--model` value ("ViT-B/16", "ViT-B-16", "tiny" or a path to a JSON file) -> resolved config.

    The result always has `clip` (open_clip CLIP kwargs, QuickGELU as the config says).
    """
    path = Path(name)
    if path.suffix != ".json":
        path = CONFIG_DIR / (name.replace("/", "-").replace("@336px", "-336") + ".json")
    if not path.is_file():
        raise ValueError(f"unknown --model {name!r}: choose one of {list_models()} or pass a JSON config file")
    cfg = json.loads(path.read_text())
    check_keys(path, cfg)
    if "clip" not in cfg:
        base = open_clip.get_model_config(cfg["open_clip_model"])
        if base is None:
            raise ValueError(f"{path}: open_clip has no model config {cfg['open_clip_model']!r}")
        cfg["clip"] = copy.deepcopy(base)
    cfg["clip"]["quick_gelu"] = cfg.get("quick_gelu", True)
    cfg["name"] = path.stem
    return cfg


def check_keys(path: Path, cfg: Dict) -> None:
    """Refuse an entry that is neither a file-only key nor a HiVGConfig field, or a missing layer choice,
    naming the file and the key."""
    missing = [key for key in REQUIRED_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"{path}: no {' or '.join(missing)}: list the 0-based vision blocks")
    known = set(FILE_ONLY_KEYS) | {f.name for f in fields(HiVGConfig)}
    for key in sorted(set(cfg) - known):
        if key in RENAMED_KEYS:
            raise ValueError(f"{path}: entry {key!r} is now spelled {RENAMED_KEYS[key]!r}; rename it")
        raise ValueError(f"{path}: unknown entry {key!r}; use one of {sorted(known)}")


def names_pretrained_clip(name: str) -> bool:
    """True when the config names an open_clip architecture, whose runs are meant to start from its
    pretrained weights (the small inline configs are for tests and the demo)."""
    return "open_clip_model" in load_model_config(name)


def has_warmup_layout(name: str) -> bool:
    """True when --warmup changes the network: the config lists the bridges of its warm-up run."""
    return "warmup_bridge_layers" in load_model_config(name)
