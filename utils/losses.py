"""Training criterion of HiVG (Xiao et al., ACM MM 2024, arXiv 2404.13400), term for term the authors'
``trans_vg_loss`` (README.md, "Parity with the authors' code").

The [REG] token's box is trained with L1 + GIoU, the paper's grounding objective; the authors' release adds
three optional auxiliary terms, each behind one of its flags: CLIP's contrastive loss (--use_contrastive_loss),
focal + dice on the per-patch token-alignment map (--use_rtcc_constrain_loss) and focal + dice on the
segmentation map (--use_mask_loss). Each head declares its terms, weights and flag (models/heads.py, the loss
functions in models/head_losses.py); every term is returned multiplied by its weight, so the training objective
is the plain sum of the returned dict's values.
"""
from typing import Dict, Iterable, Mapping, Optional

from torch import Tensor, nn

from models.heads import HEADS, enabled_heads


class GroundingCriterion(nn.Module):
    """HiVG's weighted loss terms, in the style of DETR's SetCriterion (one box per sample, so no matching).

    Built once with its heads and weights. Every call computes the loss terms of exactly those heads, in
    registry order, and raises if the model did not produce an output one of them reads; model outputs no
    head reads are ignored. Nothing reads a tensor's value on the host, so a call never syncs the device,
    and non-finite predictions give non-finite losses (the trainer's stop) instead of an exception.
    """

    def __init__(self, heads: Iterable[str] = (), weights: Optional[Mapping[str, float]] = None):
        """
        Args:
            heads: names of registered heads (models.heads.HEADS) whose losses to compute; "box" always.
            weights: loss key -> weight, overriding the heads' declared weights (the official values) key by key.
        """
        super().__init__()
        requested = set(heads) | {"box"}
        if requested - set(HEADS):
            raise ValueError(f"unknown heads {sorted(requested - set(HEADS))}; choose from {list(HEADS)}")
        declared = {term.key: term.weight for spec in HEADS.values() for term in spec.loss_terms}
        if set(weights or {}) - set(declared):
            raise ValueError(f"unknown loss weights {sorted(set(weights) - set(declared))}; "
                             f"choose from {list(declared)}")
        self.specs = tuple(spec for name, spec in HEADS.items() if name in requested)
        self.weights = {**declared, **(weights or {})}

    @property
    def heads(self):
        """Names of the heads whose losses this criterion computes, in registry order."""
        return tuple(spec.name for spec in self.specs)

    @property
    def targets(self):
        """Fields of datasets.collate.Batch the losses read, each once."""
        return tuple(dict.fromkeys(key for spec in self.specs for key in spec.targets))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, weights={self.weights}"

    def forward(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Weighted loss terms of one batch; the training loss is ``sum(losses.values())``.

        Args:
            outputs: the model's dict: 'pred_box' [B, 4] (cx, cy, w, h), normalised to the padded input,
                and what the other heads' losses read, e.g. 'logits_per_text' [B, B] (text-to-image CLIP
                logits), 'token_map' [B, P * P] (patch alignment logits), 'seg_map' [B, 1, h, w] (mask logits).
                Any float dtype: they are cast to float32 here (the trainer runs under bf16 autocast).
            targets: at least `self.targets`: 'boxes' [B, 4] (cx, cy, w, h), normalised; 'obj_masks'
                [B, H, W] or [B, 1, H, W], 0/1 GT object mask at input resolution.
        Returns:
            the heads' loss keys (box first: 'loss_bbox', 'loss_giou') -> scalar tensors, already weighted.
        Raises:
            ValueError: an output a head's loss reads is missing, or a tensor has the wrong layout.
        """
        missing = [f"'{key}' (for the {spec.name} loss{f', --{spec.flag}' if spec.flag else ''})"
                   for spec in self.specs for key in spec.outputs if key not in outputs]
        if missing:
            raise ValueError(f"the model output has no {', '.join(missing)}; it has {sorted(outputs)}. Build the "
                             "model with that head, or the criterion without that loss")
        losses = {}
        for spec in self.specs:
            # float32 whatever the autocast dtype, as the official losses run in fp32
            losses.update(spec.loss({key: outputs[key].float() for key in spec.outputs},
                                    {key: targets[key] for key in spec.targets}))
        return {key: value * self.weights[key] for key, value in losses.items()}


def build_criterion(args) -> GroundingCriterion:
    """The criterion of a training run: the heads its flags switch on (models.heads.enabled_heads), the
    official weights. The only reader of the argparse namespace in this module; a flag missing from it is off."""
    return GroundingCriterion(heads=enabled_heads(vars(args)))
