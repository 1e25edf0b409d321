"""What the command-line tools share: one error type for bad input, the device choice, and loading a
checkpoint behind the Python API with one clear message when it cannot be loaded."""
import pickle
from pathlib import Path
from typing import Optional

import torch

from models.api import Grounder
from models.convert_clip import clip_cfg_from_hf_json


class UserError(Exception):
    """A problem with the inputs: reported as one line, exit status 2, no traceback."""


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def load_grounder(path, device: torch.device, hf_clip_config: Optional[str] = None,
                  bridge_attention: str = "per_sample") -> Grounder:
    """The checkpoint's model (ours or official) behind the Python API, or a UserError saying why not."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--checkpoint {path} does not exist; pass a checkpoint written by train_hivg.py "
                        f"(e.g. OUTPUT_DIR/best_checkpoint.pth) or an official HiVG checkpoint")
    try:
        clip_cfg = clip_cfg_from_hf_json(hf_clip_config) if hf_clip_config else None
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        return Grounder.from_checkpoint(path, device, bridge_attention, clip_cfg)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError, EOFError, OSError,
            pickle.UnpicklingError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise UserError(f"--checkpoint {path} is not a HiVG model this project can load: {msg}\n"
                        "  pass a checkpoint written by train_hivg.py or utils.checkpoint, or an official HiVG "
                        "checkpoint (one whose CLIP is none of the registered --model configs also needs "
                        "--hf_clip_config)") from None
