"""Every weights file this project reads, through one entry: `read_weights(path)`.

Formats, told apart by content (not by name):

    hivg           a checkpoint of this project (models.checkpoint_format: its keys and versions)
    hivg-flags     the same in its first format, before checkpoints carried their config
    official-hivg  the authors' HiVG checkpoint: {"model": HF-CLIP + peft names, "args": argparse.Namespace}
    official-clip  the authors' debiased CLIP: {"model": HF CLIP names with peft LoRA}
    clip           CLIP weights: OpenAI TorchScript, open_clip or HF (.pt/.pth/.bin/.safetensors)

The result always holds the weights in this project's names (`Weights.state`; HiVG keys for the hivg
kinds, `CLIP` keys for the clip kinds). Nothing is loaded with pickle beyond plain types (and the
authors' argparse.Namespace).
"""
import argparse
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from datasets.splitfile import torch_format

from . import checkpoint_format
from .config import HiVGConfig
from .convert import canonical_key, check_state_dict, convert_official_state_dict, key_mismatch, official_config
from .convert_clip import HF_TOWER_PREFIXES, hf_to_open_clip
from .hivg import HiVG, config_layers_out_of_range
from .lora import OFFICIAL_ALPHA, merge_lora, merge_lora_state_dict

ADAPTER_KEYS = (".lora_in.lora_", ".lora_out.lora_")
OFFICIAL_HEADS = ("bbox_embed.", "vl_transformer.")   # the authors' box head and fusion encoder: a HiVG model
HF_CLIP_FIX = "pass its architecture as an HF CLIPConfig JSON with --hf_clip_config"


@dataclass
class Weights:
    """What `read_weights` found. `checkpoint` is the whole file for checkpoints of this project
    (optimizer, epoch, RNG states ... for --resume); `run_args` the flags of the run that wrote it."""
    path: Path
    kind: str
    state: Dict[str, Tensor]
    config: Optional[HiVGConfig] = None
    converted: int = 0
    checkpoint: Optional[dict] = None
    run_args: Optional[dict] = None
    what: str = "checkpoint"          # the flag that named the file, for messages

    @property
    def is_hivg(self) -> bool:
        return self.config is not None


def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(16)


def read_file(path, what: str = "checkpoint"):
    """The content of a weights file: safetensors, an OpenAI TorchScript archive (its state dict), or a
    PyTorch file read with weights_only=True (the authors' argparse.Namespace allowed).

    Raises FileNotFoundError, or ValueError naming `what` and `path`: a folder, an empty, truncated or damaged
    file, a file that is no PyTorch file, or one holding objects a weights-only load refuses (never loaded)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; pass the checkpoint file inside it (e.g. best_checkpoint.pth)")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    again = "copy or download it again, or pick another checkpoint"
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {path} is empty (0 bytes): the write or copy that made it did not finish; {again}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as err:
            raise ValueError(f"{what} {path} is a damaged safetensors file ({err}); {again}") from None
    kind = torch_format(path)
    if kind == "truncated zip":
        raise ValueError(f"{what} {path} is truncated (its zip archive has no end): the write or copy that made "
                         f"it did not finish; {again}")
    if kind == "other":
        head = _head(path)
        found = ("it is a plain pickle, never loaded since unpickling it can run arbitrary code"
                 if head.startswith(b"\x80") else f"it starts with {head!r}")
        raise ValueError(f"{what} {path} is not a PyTorch or safetensors file ({found}); pass a file written by "
                         "torch.save or safetensors")
    if kind == "zip" and _is_torchscript(path):
        from open_clip import load_openai_model
        try:
            return load_openai_model(str(path), precision="fp32", device="cpu").state_dict()
        except (RuntimeError, KeyError) as err:
            raise ValueError(f"{what} {path}: TorchScript archive that open_clip's OpenAI loader cannot read "
                             f"({err})") from err
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:   # what the weights-only unpickler raises when it refuses an object
        found = re.search(r"GLOBAL (\S+)", str(err))
        raise ValueError(f"{what} {path} holds Python objects besides tensors and plain types"
                         f"{f' ({found.group(1)})' if found else ''}; it was refused unread, since loading them "
                         "can run arbitrary code. Use a file written by train_hivg.py, or save the weights as a "
                         "plain state dict of tensors (torch.save(model.state_dict())) or as safetensors") from None
    except Exception as err:  # noqa: BLE001 - whatever the bytes make torch.load raise, the file is damaged
        detail = str(err).strip().split("\n")[0].split(". ")[0] or type(err).__name__
        raise ValueError(f"{what} {path} is damaged and cannot be read ({detail}); {again}") from None


def read_weights(path, clip_cfg: Optional[dict] = None, what: str = "checkpoint",
                 official_overrides: Optional[dict] = None) -> Weights:
    """Read any weights file we support (module docstring) into our names.

    `clip_cfg`: the CLIP architecture of an authors' checkpoint whose CLIP is none of the registered
    configs (open_clip kwargs, e.g. from an HF CLIPConfig); refused for files that carry their own.
    `official_overrides`: model flags replacing those of an authors' checkpoint (e.g. {"model": ...}).
    """
    path = Path(path)
    raw = read_file(path, what)
    try:
        weights = _interpret(path, raw, clip_cfg, what=what, official_overrides=official_overrides)
    except (KeyError, TypeError, AttributeError, IndexError) as err:   # a dict of some other program
        raise ValueError(f"{what} {path} is not a checkpoint this project can read ({type(err).__name__}: "
                         f"{err}); pass a checkpoint written by train_hivg.py, an authors' HiVG checkpoint or "
                         "CLIP weights") from None
    check_finite(weights.state, f"{what} {path}")
    weights.what = what
    return weights


def check_finite(state: Dict[str, Tensor], what: str) -> None:
    """Refuse NaN or infinite weights by name: a model holding them predicts NaN boxes (not even valid JSON)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ValueError(f"{what}: tensor {bad[0]}{more} holds NaN or infinite values, so every prediction would "
                         "be NaN; the run that wrote it diverged or the file was damaged: pick an earlier checkpoint")


def _interpret(path: Path, raw, clip_cfg: Optional[dict], *, what: str, official_overrides: Optional[dict]) -> Weights:
    ours = checkpoint_format.is_checkpoint(raw)
    if ours and clip_cfg is not None:
        raise ValueError(f"{what} {path} is a checkpoint of this project and carries its CLIP config; a CLIP "
                         "config is only for the authors' checkpoints: drop --hf_clip_config")
    if ours:
        return _ours(path, raw, what)
    inner = raw.get("model") if isinstance(raw, dict) else None
    if isinstance(inner, dict) and "args" in raw:
        return _official_hivg(path, inner, raw["args"], clip_cfg=clip_cfg, overrides=official_overrides, what=what)
    if isinstance(inner, dict) and any(canonical_key(k).startswith(OFFICIAL_HEADS) for k in inner):
        raise ValueError(f"{what} {path} holds an authors' HiVG model ({len(inner)} tensors) but not the flags of "
                         "its training run ('args'), which define its architecture (--model, --dataset, --imsize, "
                         "--hi_lora_stage, ...); add them to the file: ckpt['args'] = {'model': 'ViT-B/16', "
                         "'dataset': 'unc', 'imsize': 224, 'hi_lora_stage': 1, ...} as in its training command, "
                         "then torch.save(ckpt, ...); for a CLIP that is none of our --model configs also "
                         f"{HF_CLIP_FIX}")
    if isinstance(inner, dict) and any(".lora_A." in k for k in inner):
        state = convert_official_state_dict(inner)
        clip_state = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
        return Weights(path, "official-clip", clip_state, converted=len(clip_state))
    if isinstance(inner, dict) and inner and all(isinstance(v, Tensor) for v in inner.values()):
        raise ValueError(f"{what} {path} holds a 'model' state dict ({len(inner)} tensors) but neither the 'config' "
                         "that this project's checkpoints carry nor the authors' training flags ('args'), so its "
                         "architecture is unknown; pass the file as train_hivg.py wrote it (checkpoint.pth, "
                         "best_checkpoint.pth), or add the flags of its training run: ckpt['args'] = {...}")
    return _clip(path, raw, what)


def _ours(path: Path, raw: dict, what: str) -> Weights:
    if not isinstance(raw.get("model"), dict):
        raise ValueError(f"{what} {path} has no 'model' state dict")
    kind, config = checkpoint_format.read_config(raw, f"{what} {path}")
    weights = Weights(path, kind, raw["model"], config=config, checkpoint=raw, run_args=raw.get("args"))
    why = "the file was edited or mixed up with another model's" if kind == "hivg" else \
        "that config changed since the run: restore the models/configs file it was trained with"
    out_of_range = config_layers_out_of_range(weights.config)
    if out_of_range:
        model = (weights.run_args or {}).get("model", weights.config.name)
        raise ValueError(f"{what} {path}: the blocks its run's --model {model} selects are not all in the CLIP "
                         f"stored with it: {out_of_range}; {why}")
    return weights


def _official_hivg(path: Path, state: dict, args, *, clip_cfg: Optional[dict], overrides: Optional[dict],
                   what: str) -> Weights:
    flags = vars(args) if isinstance(args, argparse.Namespace) else args
    if not isinstance(flags, dict):
        raise ValueError(f"{what} {path}: 'args' is neither an argparse.Namespace nor a dict: not a HiVG checkpoint")
    # The authors set the fusion width by hand; ours is the CLIP's, so a width that differs means another CLIP.
    fusion = flags.get("vl_hidden_dim")
    config = official_config({k: v for k, v in flags.items() if k != "vl_hidden_dim"}, clip_cfg, **(overrides or {}))
    clip = "the CLIP of --hf_clip_config" if clip_cfg else f"the CLIP of its --model {config.name}"
    fix = "pass the HF CLIPConfig JSON of this checkpoint's CLIP" if clip_cfg else \
        f"its CLIP is none of our --model configs: {HF_CLIP_FIX}"
    if fusion not in (None, config.clip["embed_dim"]):
        raise ValueError(f"{what} {path}: the authors' flags stored in it give a fusion width (vl_hidden_dim) of "
                         f"{fusion}, but {clip} is {config.clip['embed_dim']} wide; {fix}")
    out_of_range = config_layers_out_of_range(config)
    if out_of_range:
        raise ValueError(f"{what} {path}: its flags' --model {flags.get('model', config.name)} selects blocks "
                         f"{clip} does not have: {out_of_range}; {fix}")
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        expected = HiVG(config).state_dict()
    try:
        converted = convert_official_state_dict(state, expected=expected)
    except ValueError as err:
        hint = "" if clip_cfg else f"; if its CLIP is none of our --model configs, {HF_CLIP_FIX}"
        raise ValueError(f"{what} {path}: {err}{hint}") from None
    return Weights(path, "official-hivg", converted, config=config, converted=len(converted), run_args=flags)


def _clip(path: Path, raw, what: str) -> Weights:
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what} {path} is neither a HiVG checkpoint nor CLIP weights (expected a non-empty "
                         f"state dict of tensors, got {type(state).__name__})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(k.startswith(HF_TOWER_PREFIXES) for k in state):
        try:
            return Weights(path, "clip", hf_to_open_clip(state), converted=len(state))
        except ValueError as err:
            raise ValueError(f"{what} {path}: {err}") from err
    if not any(k.startswith("visual.") or k == "token_embedding.weight" for k in state):
        raise ValueError(f"{what} {path}: neither HF CLIPModel nor open_clip CLIP key names (first keys: "
                         f"{', '.join(list(state)[:3])}); convert it to one of these layouts first")
    return Weights(path, "clip", state)


def load_strict(model: torch.nn.Module, state: Dict[str, Tensor], what: str = "checkpoint") -> None:
    """Every key used, every parameter given, same shapes: else one error naming `what` and the keys."""
    check_state_dict(state, model.state_dict(), what)
    model.load_state_dict(state, strict=True)


def load_model(source, device="cpu", merge: bool = True, clip_cfg: Optional[dict] = None,
               **config_changes) -> HiVG:
    """The HiVG model of any checkpoint we read (a path, or what read_weights returned), loaded strictly,
    in eval mode on `device`.

    `merge` folds every LoRA adapter into its weight (inference); `config_changes` replace entries of
    the checkpoint's config that do not change the weights (e.g. bridge_attention="per_sample").
    """
    weights = source if isinstance(source, Weights) else read_weights(source, clip_cfg)
    if not weights.is_hivg:
        raise ValueError(f"{weights.what} {weights.path} holds CLIP weights ({weights.kind}), not a HiVG model; "
                         "pass a HiVG checkpoint (CLIP weights start a training run: train_hivg.py --clip_model)")
    model = HiVG(weights.config.replace(**config_changes))
    load_strict(model, weights.state, f"{weights.what} {weights.path}")
    if merge:
        merge_lora(model)
    return model.to(device).eval()


def load_allowing_fresh(module: torch.nn.Module, state: Dict[str, Tensor], what: str, *,
                        fresh_prefixes: Sequence[str] = ()) -> List[str]:
    """Load `state` into `module`; the only keys it may lack are LoRA adapters and keys starting with
    `fresh_prefixes` (they keep their fresh initialisation). Returns the fresh keys; one error naming
    the offending keys otherwise."""
    fresh, expected = tuple(fresh_prefixes), module.state_dict()
    mismatch = key_mismatch(state, expected,
                            lambda key: any(a in key for a in ADAPTER_KEYS) or key.startswith(fresh))
    if mismatch:
        raise ValueError(f"{what} does not match the model of this run (check --model / --dataset / --imsize / "
                         f"--hi_lora_mode): {mismatch}")
    module.load_state_dict(state, strict=False)
    return sorted(set(expected) - set(state))


def load_previous_stage(model: HiVG, weights: Weights) -> List[str]:
    """A previous run's weights (a Hi LoRA stage's best checkpoint, or --retrain) into `model`.

    Paper mode folds the earlier adapters into the weights (they are frozen for good) and the new stage's
    adapters start fresh; official mode carries every adapter over. Bridges the previous run did not have
    (a ViT-L warmup run) start fresh too. Returns the fresh keys.
    """
    if not weights.is_hivg:
        raise ValueError(f"{weights.what} {weights.path} holds CLIP weights ({weights.kind}); give it to --clip_model")
    state = merge_lora_state_dict(weights.state, alpha=weights.config.lora_alpha) \
        if model.config.hi_lora_mode == "paper" else weights.state
    new_bridges = [f"bridges.{i}." for i in model.bridge_layers if i not in weights.config.bridge_layers]
    return load_allowing_fresh(model, state, f"{weights.what} {weights.path}", fresh_prefixes=new_bridges)


def load_clip(model: HiVG, weights: Weights) -> None:
    """CLIP weights into `model.clip`; the LoRA of the authors' debiased CLIP is merged in paper mode and
    kept in official mode. The multi-level visual projection is then re-initialised from the loaded CLIP."""
    if weights.is_hivg:
        raise ValueError(f"--clip_model {weights.path} is a HiVG checkpoint; start from it with --retrain")
    state = weights.state
    if weights.kind == "official-clip" and model.config.hi_lora_mode == "paper":
        state = merge_lora_state_dict(state, alpha=OFFICIAL_ALPHA)
    load_allowing_fresh(model.clip, state, f"{weights.what} {weights.path}")
    model.reset_visual_projection()
