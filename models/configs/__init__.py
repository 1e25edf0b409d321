"""Model variants as data: one JSON file per `--model`, registered by file name.

A config names an open_clip architecture (`open_clip_model`) or carries its kwargs inline (`clip`),
plus the HiVG layer choices: `bridge_layers`, `extract_layers` (0-based vision blocks), optionally
`warmup_bridge_layers` (bridges used with `--warmup`) and `token_mlp_width`. A config for a random CLIP
may set `vision_pos_embed_init` ("sincos"), `vision_pos_embed_temperature`, `vision_pos_embed_scale` and
`vision_patch_embed_init` ("dct") (models.random_init).
"""
import copy
import json
from pathlib import Path
from typing import Dict, List

import open_clip

CONFIG_DIR = Path(__file__).resolve().parent


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
    if "clip" not in cfg:
        base = open_clip.get_model_config(cfg["open_clip_model"])
        if base is None:
            raise ValueError(f"{path}: open_clip has no model config {cfg['open_clip_model']!r}")
        cfg["clip"] = copy.deepcopy(base)
    cfg["clip"]["quick_gelu"] = cfg.get("quick_gelu", True)
    cfg["name"] = path.stem
    return cfg


def names_pretrained_clip(name: str) -> bool:
    """True when the config names an open_clip architecture, whose runs are meant to start from its
    pretrained weights (the small inline configs are for tests and the demo)."""
    return "open_clip_model" in load_model_config(name)


def has_warmup_layout(name: str) -> bool:
    """True when --warmup changes the network: the config lists the bridges of its warm-up run."""
    return "warmup_bridge_layers" in load_model_config(name)
