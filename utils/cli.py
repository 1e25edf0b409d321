"""What the command-line tools share beyond the error path (utils.errors) and the device choice
(utils.distributed.resolve_device): loading a checkpoint behind the Python API."""
from typing import Optional

import torch

from models.api import Grounder
from models.convert_clip import clip_cfg_from_hf_json
from models.weights import load_model, read_weights


def load_grounder(path, device: torch.device, *, hf_clip_config: Optional[str] = None,
                  bridge_attention: str = "per_sample") -> Grounder:
    """The checkpoint's model (ours or official) behind the Python API; a ValueError or FileNotFoundError
    naming --checkpoint when it cannot be read or is no HiVG model."""
    clip_cfg = clip_cfg_from_hf_json(hf_clip_config) if hf_clip_config else None
    weights = read_weights(path, clip_cfg, what="--checkpoint")
    return Grounder(load_model(weights, device, bridge_attention=bridge_attention), device)
