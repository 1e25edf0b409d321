"""Batching of transformed records, with the phrases tokenised (in the loader workers, not in the step)."""
from typing import List, NamedTuple, Optional

import numpy as np
import torch

from .tokens import CONTEXT_LENGTH, tokenize
from .transforms import Record


class Batch(NamedTuple):
    """What the model and the losses consume (B samples, input side S, T text tokens).

    images:     [B, 3, S, S] float32, ImageNet-normalised, zeros on padding.
    pixel_mask: [B, S, S] int32, 1 on padded pixels, 0 on image pixels (the dtype the
                official collate hands the model).
    ids:        [B, T] int64 CLIP token ids of the lower-cased phrases, zero-padded.
    boxes:      [B, 4] float32 ground truth, normalised (cx, cy, w, h) in the padded frame.
    obj_masks:  [B, S, S] float32 0/1 ground-truth object mask (box or polygon) in the padded frame.
    texts:      the B phrases as given (for reports and pictures).
    original_masks: per sample, the [H, W] bool ground-truth mask of its original image in evaluation splits
                (the mask metrics' ground truth, models/mask_metrics.py), None in training; stays on the host.
    """
    images: torch.Tensor
    pixel_mask: torch.Tensor
    ids: torch.Tensor
    boxes: torch.Tensor
    obj_masks: torch.Tensor
    texts: List[str]
    original_masks: List[Optional[np.ndarray]] = []

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """Move the tensors to ``device``; texts and original masks stay lists on the host."""
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self[:5]), self.texts, self.original_masks)


class Collate:
    """Stack records (all of the same input side) into a Batch, tokenising to `context_length` tokens."""

    def __init__(self, context_length: int = CONTEXT_LENGTH):
        self.context_length = context_length

    def __call__(self, records: List[Record]) -> Batch:
        return Batch(images=torch.stack([r.image for r in records]),
                     pixel_mask=torch.stack([r.pixel_mask for r in records]),
                     ids=tokenize([r.phrase for r in records], self.context_length),
                     boxes=torch.stack([r.box for r in records]),
                     obj_masks=torch.stack([r.obj_mask for r in records]),
                     texts=[r.phrase for r in records],
                     original_masks=[r.original_mask for r in records])
