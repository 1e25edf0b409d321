"""Batching of transformed records."""
from typing import List, NamedTuple

import torch

from .transforms import Record


class Batch(NamedTuple):
    """What the model and the losses consume (B samples, input side S).

    images:     [B, 3, S, S] float32, ImageNet-normalised, zeros on padding.
    pixel_mask: [B, S, S] int32, 1 on padded pixels, 0 on image pixels (the dtype the
                official collate hands the model).
    texts:      list of B lower-cased phrases, untokenised (the model tokenises).
    boxes:      [B, 4] float32 ground truth, normalised (cx, cy, w, h) in the padded frame.
    obj_masks:  [B, S, S] float32 0/1 ground-truth object mask (box or polygon) in the padded frame.
    """
    images: torch.Tensor
    pixel_mask: torch.Tensor
    texts: List[str]
    boxes: torch.Tensor
    obj_masks: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """Move the tensors to ``device``; texts stay a list."""
        return Batch(self.images.to(device, non_blocking=non_blocking),
                     self.pixel_mask.to(device, non_blocking=non_blocking),
                     self.texts,
                     self.boxes.to(device, non_blocking=non_blocking),
                     self.obj_masks.to(device, non_blocking=non_blocking))


def collate_fn(records: List[Record]) -> Batch:
    """Stack records produced by the dataset (all of the same input side) into a Batch."""
    return Batch(images=torch.stack([r.image for r in records]),
                 pixel_mask=torch.stack([r.pixel_mask for r in records]),
                 texts=[r.phrase for r in records],
                 boxes=torch.stack([r.box for r in records]),
                 obj_masks=torch.stack([r.obj_mask for r in records]))
