"""Checkpoint I/O: atomic writes and safe reads."""
import os
import tempfile
from pathlib import Path

import torch


def save_checkpoint(path, obj) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A crash mid-write leaves the previous file intact: the rename is atomic on POSIX file systems.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path) -> dict:
    """Read one of our checkpoints (plain tensors and Python values only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a HiVG checkpoint (no 'model' entry)")
    return ckpt


def build_model_from_checkpoint(ckpt: dict, merge: bool = False):
    """Rebuild the model a checkpoint of ours describes (its args and CLIP config) and load it strictly.

    `merge=True` folds every LoRA adapter into its weight (inference).
    """
    from argparse import Namespace

    from models.convert import check_state_dict
    from models.hivg import build_model
    from models.lora import merge_lora

    if "args" not in ckpt:
        raise ValueError("checkpoint has no 'args': it was not written by this project "
                         "(convert an official one with `python -m models.convert`)")
    model = build_model(Namespace(**ckpt["args"]), clip_cfg=ckpt.get("clip_cfg"))
    check_state_dict(ckpt["model"], model.state_dict())
    model.load_state_dict(ckpt["model"], strict=True)
    if merge:
        merge_lora(model)
    return model
