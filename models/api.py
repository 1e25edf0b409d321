"""Python API: a HiVG model from any checkpoint we read, in one call, grounding expressions in PIL images.

    from PIL import Image
    from models.api import Grounder
    grounder = Grounder.from_checkpoint("best_checkpoint.pth", device="cpu")
    [hit] = grounder.ground([Image.open("street.jpg")], ["the man in the red shirt on the left"])
    print(hit.box_xyxy, hit.score)

Images go through the evaluation transform of the model's input size (long side resized, centred padding)
and boxes come back through the exact inverse of that letterbox, in pixels of the original image. The
bridge runs per sample by default, so a prediction does not depend on the other pairs of its batch.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from datasets.tokens import tokenize
from datasets.transforms import Letterbox, Record, make_transforms

from .hivg import HiVG
from .weights import load_model


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
    score: mean token-alignment probability of the patches inside the box, in [0, 1] (None when the model
        was trained without the token-alignment loss, whose head would be untrained).
    box_padded: [4] normalised (cx, cy, w, h) in the S x S padded frame.
    attention: [gh, gw] [REG] attention over the patches in the last fusion layer (sums to 1), on request.
    token_map: [gh, gw] token-alignment logits, on request.
    """
    box_xyxy: List[float]
    score: Optional[float]
    box_padded: torch.Tensor
    letterbox: Letterbox
    attention: Optional[np.ndarray] = None
    token_map: Optional[np.ndarray] = None


def prepare(image: Image.Image, size: int) -> Prepared:
    """The eval transform of an RGB-convertible PIL image, decoded fully as the authors' loader does; `image`
    itself is left unchanged."""
    w, h = image.size
    record = Record(image=image, box=torch.zeros(4), phrase="", obj_mask=np.zeros((h, w), dtype=bool))
    record = make_transforms(size, train=False)(record)
    return Prepared(record.image, record.pixel_mask, Letterbox.of(w, h, size))


def box_score(token_map: torch.Tensor, box_cxcywh: torch.Tensor, grid) -> torch.Tensor:
    """token_map [B, N] logits, boxes [B, 4] normalised -> [B]: mean sigmoid over the patches whose
    centres lie in the box (the patch under the box centre when none does)."""
    gh, gw = grid
    ys = (torch.arange(gh, device=token_map.device) + 0.5) / gh
    xs = (torch.arange(gw, device=token_map.device) + 0.5) / gw
    cx, cy, w, h = box_cxcywh.unbind(-1)
    inside_y = (ys[None] - cy[:, None]).abs() <= h[:, None] / 2
    inside_x = (xs[None] - cx[:, None]).abs() <= w[:, None] / 2
    inside = (inside_y[:, :, None] & inside_x[:, None, :]).flatten(1)
    centre = ((cy * gh).long().clamp(0, gh - 1) * gw + (cx * gw).long().clamp(0, gw - 1))
    inside[torch.arange(len(centre)), centre] |= ~inside.any(dim=1)
    prob = token_map.sigmoid() * inside
    return prob.sum(dim=1) / inside.sum(dim=1)


class Grounder:
    """A HiVG model (eval mode, LoRA merged) with its input transform and box read-out."""

    def __init__(self, model: HiVG, device=None):
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.scored = "token_map" in model.config.outputs

    @classmethod
    def from_checkpoint(cls, path, device="cpu", bridge_attention: str = "per_sample",
                        clip_cfg: Optional[dict] = None) -> "Grounder":
        """Any HiVG checkpoint we read (ours, or the authors' converted on load; `clip_cfg` describes the
        CLIP of an authors' checkpoint none of our configs names). `bridge_attention="official"` runs the
        authors' batch-mixing bridge, whose predictions depend on the batch."""
        return cls(load_model(path, device, clip_cfg=clip_cfg, bridge_attention=bridge_attention), device)

    def prepare(self, image: Image.Image) -> Prepared:
        return prepare(image, self.model.image_size)

    def ground(self, images: Sequence[Image.Image], texts: Sequence[str], heatmap: bool = False,
               token_map: bool = False) -> List[Grounding]:
        """The box of texts[i] in images[i] (pass the same image several times for several expressions)."""
        return self.ground_prepared([self.prepare(im) for im in images], texts, heatmap, token_map)

    @torch.inference_mode()
    def ground_prepared(self, prepared: Sequence[Prepared], texts: Sequence[str], heatmap: bool = False,
                        token_map: bool = False) -> List[Grounding]:
        """One forward pass over (prepared[i], texts[i]) pairs."""
        if len(prepared) != len(texts):
            raise ValueError(f"{len(prepared)} images for {len(texts)} texts: give one image per expression")
        model = self.model
        images = torch.stack([p.image for p in prepared]).to(self.device)
        masks = torch.stack([p.pixel_mask for p in prepared]).to(self.device)
        ids = tokenize(list(texts), model.context_length).to(self.device)
        outputs = ["box"] + (["reg_attention"] if heatmap else []) + \
            (["token_map"] if token_map or self.scored else [])
        out = model(images, masks, ids, outputs=outputs)
        boxes = out["pred_box"].float()
        scores = box_score(out["token_map"].float(), boxes, model.grid).tolist() if self.scored else None
        results = []
        for i, p in enumerate(prepared):
            box = boxes[i].cpu()
            hit = Grounding(p.letterbox.to_original(box).tolist(), scores[i] if scores else None, box, p.letterbox)
            if heatmap:
                hit.attention = out["reg_attention"][i].float().cpu().reshape(model.grid).numpy()
            if token_map:
                hit.token_map = out["token_map"][i].float().cpu().reshape(model.grid).numpy()
            results.append(hit)
        return results
