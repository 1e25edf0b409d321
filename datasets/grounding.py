"""What every grounder shares, whatever runs the network (models.api.Grounder in PyTorch, utils.onnx_grounder
through onnxruntime): one image through the eval transform (`prepare`) and one result (`Grounding`)."""
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from PIL import Image

from .transforms import Letterbox, Record, make_transforms

MASK_THRESHOLD = 0.5   # on the sigmoid of the segmentation logits


@dataclass
class Prepared:
    """One image through the eval transform: image [3, S, S], padding mask [S, S] int32, its letterbox."""
    image: torch.Tensor
    pixel_mask: torch.Tensor
    letterbox: Letterbox


@dataclass
class Grounding:
    """One (image, expression) result.

    box_xyxy: [x0, y0, x1, y1] in pixels of the original image, clipped to it.
    score: the box's confidence in [0, 1] from the first enabled head that declares one (the token-alignment
        head's: mean probability of the patches inside the box); None when no trained head scores boxes.
    box_padded: [4] normalised (cx, cy, w, h) in the S x S padded frame.
    attention: [gh, gw] [REG] attention over the patches in the last fusion layer (sums to 1), on request.
    token_map: [gh, gw] token-alignment logits, on request.
    mask: [height, width] bool over the original image, on request: the segmentation head's probability above
        MASK_THRESHOLD (docs/method.md, section 4).
    """
    box_xyxy: List[float]
    score: Optional[float]
    box_padded: torch.Tensor
    letterbox: Letterbox
    attention: Optional[np.ndarray] = None
    token_map: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None


def prepare(image: Image.Image, size: int) -> Prepared:
    """The eval transform of an RGB-convertible PIL image, decoded fully as the authors' loader does; `image`
    itself is left unchanged."""
    w, h = image.size
    record = Record(image=image, box=torch.zeros(4), phrase="", obj_mask=np.zeros((h, w), dtype=bool))
    record = make_transforms(size, train=False)(record)
    return Prepared(record.image, record.pixel_mask, Letterbox.of(w, h, size))
