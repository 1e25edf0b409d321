"""Python API: a HiVG model from any checkpoint we read, in one call, grounding expressions in PIL images.

    from PIL import Image
    from models.api import Grounder
    grounder = Grounder.from_checkpoint("best_checkpoint.pth", device="cpu")
    [hit] = grounder.ground([Image.open("street.jpg")], ["the man in the red shirt on the left"])
    print(hit.box_xyxy, hit.score)
    [hit] = grounder.ground([Image.open("street.jpg")], ["the bus"], mask=True)   # models trained with --use_mask_loss
    print(hit.mask.shape)                                                           # (height, width) of the image

Images go through the evaluation transform of the model's input size (long side resized, centred padding)
and boxes come back through the exact inverse of that letterbox, in pixels of the original image; masks
(the segmentation head's logits) through the same letterbox, as bool arrays of the original image. The
bridge runs per sample by default, so a prediction does not depend on the other pairs of its batch.
"""
from typing import List, Optional, Sequence

import torch
from PIL import Image

from datasets.grounding import MASK_THRESHOLD, Grounding, Prepared, prepare
from datasets.tokens import tokenize

from .heads import HEADS
from .hivg import HiVG
from .weights import load_model

SEG_HEAD = "seg_map"


class Grounder:
    """A HiVG model (eval mode, LoRA merged) with its input transform and box read-out."""

    def __init__(self, model: HiVG, device=None):
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        # the first trained head that scores boxes (models.heads.HeadSpec.score)
        self.scorer = next((HEADS[name] for name in model.config.outputs if name in HEADS and HEADS[name].score),
                           None)
        self.scored = self.scorer is not None
        # masks only from a model whose segmentation head was trained (every model holds the module)
        self.segments = SEG_HEAD in model.config.outputs

    @classmethod
    def from_checkpoint(cls, path, device="cpu", bridge_attention: str = "per_sample",
                        clip_cfg: Optional[dict] = None) -> "Grounder":
        """Any HiVG checkpoint we read (ours, or the authors' converted on load; `clip_cfg` describes the
        CLIP of an authors' checkpoint none of our configs names). `bridge_attention="official"` runs the
        authors' batch-mixing bridge, whose predictions depend on the batch."""
        return cls(load_model(path, device, clip_cfg=clip_cfg, bridge_attention=bridge_attention), device)

    @property
    def context_length(self) -> int:
        """Text tokens per expression; a longer expression is truncated."""
        return self.model.context_length

    def prepare(self, image: Image.Image) -> Prepared:
        return prepare(image, self.model.image_size)

    def ground(self, images: Sequence[Image.Image], texts: Sequence[str], *, heatmap: bool = False,
               token_map: bool = False, mask: bool = False) -> List[Grounding]:
        """The box (and with `mask` the mask) of texts[i] in images[i] (pass the same image several times for
        several expressions)."""
        return self.ground_prepared([self.prepare(im) for im in images], texts, heatmap=heatmap, token_map=token_map,
                                    mask=mask)

    @torch.inference_mode()
    def ground_prepared(self, prepared: Sequence[Prepared], texts: Sequence[str], *, heatmap: bool = False,
                        token_map: bool = False, mask: bool = False) -> List[Grounding]:
        """One forward pass over (prepared[i], texts[i]) pairs."""
        if len(prepared) != len(texts):
            raise ValueError(f"{len(prepared)} images for {len(texts)} texts: give one image per expression")
        if mask and not self.segments:
            raise ValueError("mask=True: this model was trained without the segmentation head, so it gives no "
                             "masks; train it with --use_mask_loss")
        model = self.model
        images = torch.stack([p.image for p in prepared]).to(self.device)
        masks = torch.stack([p.pixel_mask for p in prepared]).to(self.device)
        ids = tokenize(list(texts), model.context_length).to(self.device)
        outputs = ["box"] + (["reg_attention"] if heatmap else []) + (["token_map"] if token_map else []) + \
            ([self.scorer.name] if self.scored else []) + ([SEG_HEAD] if mask else [])
        out = model(images, masks, ids, outputs=outputs)
        boxes = out["pred_box"].float()
        scores = self.scorer.score(out, boxes, model.grid, model.image_size).tolist() if self.scored else None
        results = []
        for i, p in enumerate(prepared):
            box = boxes[i].cpu()
            hit = Grounding(box_xyxy=p.letterbox.to_original(box).tolist(), score=scores[i] if scores else None,
                            box_padded=box, letterbox=p.letterbox)
            if heatmap:
                hit.attention = out["reg_attention"][i].float().cpu().reshape(model.grid).numpy()
            if token_map:
                hit.token_map = out["token_map"][i].float().cpu().reshape(model.grid).numpy()
            if mask:
                hit.mask = p.letterbox.mask_to_original(out[SEG_HEAD][i, 0], threshold=MASK_THRESHOLD)
            results.append(hit)
        return results
