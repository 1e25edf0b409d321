"""Checkpoint I/O: atomic writes, safe reads, and the converter command for the authors' checkpoints.

    python -m utils.checkpoint OFFICIAL.pth OUT.pth [--hf_clip_config CLIPConfig.json]
"""
import argparse
import os
import sys
import tempfile
from argparse import Namespace
from pathlib import Path
from typing import Optional

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
    if "args" not in ckpt:
        raise ValueError("checkpoint has no 'args': it was not written by this project "
                         "(convert an official one with `python -m utils.checkpoint`)")
    return _build_and_load(dict(ckpt["args"]), ckpt["model"], ckpt.get("clip_cfg"), False, merge)


def load_model(path, clip_cfg: Optional[dict] = None, merge: bool = True, **overrides):
    """(model, its args dict) from a checkpoint of ours or an official one (converted on load), strictly.

    `clip_cfg` describes the CLIP of an official checkpoint that is none of the registered --model
    configs; `overrides` replace model flags (e.g. bridge_attention). LoRA merged unless merge=False.
    """
    model_args, state, own_clip_cfg, ckpt = read_any_checkpoint(path)
    if ckpt is not None and clip_cfg is not None:
        raise ValueError(f"{path} is a checkpoint of this project and carries its CLIP config; a CLIP "
                         "config is only for official checkpoints: drop the flag")
    model_args.update({k: v for k, v in overrides.items() if v is not None})
    model = _build_and_load(model_args, state, clip_cfg or own_clip_cfg, ckpt is None, merge)
    return model, model_args


def _build_and_load(model_args: dict, state: dict, clip_cfg, official: bool, merge: bool):
    from models.convert import check_state_dict, convert_official_state_dict
    from models.hivg import build_model
    from models.lora import merge_lora

    model = build_model(Namespace(**model_args), clip_cfg=clip_cfg)
    if official:
        state = convert_official_state_dict(state, expected=model.state_dict())
    check_state_dict(state, model.state_dict())
    model.load_state_dict(state, strict=True)
    if merge:
        merge_lora(model)
    return model


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states as plain values (weights_only-safe)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_our_checkpoint(ckpt: dict) -> bool:
    return isinstance(ckpt.get("args"), dict) and "clip_cfg" in ckpt


def _try_plain_load(path: Path, what: str):
    """The file's content if it loads with weights_only=True, else None (other formats are tried next)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None


def read_any_checkpoint(path):
    """Our checkpoint, or the authors' converted on the fly: (model args dict, state dict, clip_cfg, ckpt).

    For an official checkpoint the state dict keeps the official names (convert it against the built
    model with models.convert.convert_official_state_dict) and `ckpt` is None.
    """
    path = Path(path)
    ckpt = _try_plain_load(path, "checkpoint")
    if isinstance(ckpt, dict) and is_our_checkpoint(ckpt):
        return dict(ckpt["args"]), ckpt["model"], ckpt["clip_cfg"], ckpt
    from models.convert import load_official_checkpoint, official_args_to_ours
    state, official_args = load_official_checkpoint(str(path))
    if official_args is None:
        raise ValueError(f"{path} is neither a checkpoint of this project nor an official HiVG checkpoint "
                         "(no 'args' entry)")
    args = dict(official_args)
    args.update(vars(official_args_to_ours(official_args)))
    return args, state, None, None


ADAPTER_KEY = (".lora_in.lora_", ".lora_out.lora_")


def load_allowing_fresh_adapters(module, state: dict, what: str, fresh_prefixes=()) -> list:
    """Load `state` into `module`; the only keys it may lack are LoRA adapters and keys starting with
    `fresh_prefixes` (they stay freshly initialised). Returns the keys left fresh; ValueError naming
    the offending keys otherwise."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    bad_missing = [k for k in missing if not any(a in k for a in ADAPTER_KEY) and not k.startswith(tuple(fresh_prefixes))]
    if bad_missing or unexpected or wrong:
        raise ValueError(
            f"{what} does not match the model (check --model / --dataset / --imsize / --hi_lora_mode):"
            + (f"\n  missing: {bad_missing[:8]}" if bad_missing else "")
            + (f"\n  unexpected: {unexpected[:8]}" if unexpected else "")
            + ("\n  shape mismatch: " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                                                  for k in wrong[:8]) if wrong else ""))
    module.load_state_dict(state, strict=False)
    return missing


def prepare_stage_state(state: dict, official: bool, model, mode: str) -> dict:
    """A previous stage's weights (ours or official names) ready for `model` of the next stage.

    Official names are converted first. In paper mode earlier adapters are folded into the weights
    (they are frozen for good); the new stage's adapters start fresh. In official mode adapters carry over.
    """
    from models.convert import convert_official_state_dict
    from models.lora import merge_lora_state_dict

    if official:
        expected = model.state_dict() if mode == "official" else None
        state = convert_official_state_dict(state, expected=expected)
    return merge_lora_state_dict(state) if mode == "paper" else state


def load_clip_weights(model, path, mode: str = "paper") -> None:
    """CLIP weights into `model.clip`: an open_clip / OpenAI / HF file, or the official debiased CLIP
    ({'model': HF names with peft LoRA}), whose LoRA is merged in paper mode and kept in official mode."""
    from models.convert_clip import load_clip_state_dict

    raw = _try_plain_load(Path(path), "--clip_model")
    sd = raw.get("model") if isinstance(raw, dict) else None
    if isinstance(sd, dict) and any(".lora_A." in k for k in sd):
        state = prepare_stage_state(sd, True, model, "paper" if mode == "paper" else "keep")
        state = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
    else:
        state = load_clip_state_dict(path)
    load_allowing_fresh_adapters(model.clip, state, f"CLIP weights {path}")
    model.reset_visual_projection()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Convert an official HiVG checkpoint to this project's format.")
    parser.add_argument("official", help="official checkpoint (.pth with 'model' and 'args')")
    parser.add_argument("out", help="output checkpoint path")
    parser.add_argument("--model", help="override the backbone (default: the checkpoint's args.model)")
    parser.add_argument("--hf_clip_config", help="CLIP architecture from an HF CLIPConfig JSON (for a CLIP that "
                                                 "is none of the registered --model configs)")
    opts = parser.parse_args(argv)
    from models.convert_clip import clip_cfg_from_hf_json

    clip_cfg = clip_cfg_from_hf_json(opts.hf_clip_config) if opts.hf_clip_config else None
    model, args = load_model(opts.official, clip_cfg, merge=False, model=opts.model)
    save_checkpoint(opts.out, {"model": model.state_dict(), "args": args, "clip_cfg": model.clip_cfg})
    print(f"wrote {opts.out}: {args.get('model')} at Hi LoRA stage {args.get('hi_lora_stage')} "
          f"({args.get('hi_lora_mode')} mode), {len(model.state_dict())} tensors")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
