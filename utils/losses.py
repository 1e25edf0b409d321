"""Training criterion of HiVG (Xiao et al., ACM MM 2024, arXiv 2404.13400), term for term the authors'
``trans_vg_loss`` (README.md, "Parity with the authors' code").

The [REG] token's box is trained with L1 + GIoU, the paper's grounding objective; the authors' release adds
three optional auxiliary terms, each behind one of its flags: CLIP's contrastive loss (--use_contrastive_loss),
focal + dice on the per-patch token-alignment map (--use_rtcc_constrain_loss) and focal + dice on the
segmentation map (--use_mask_loss). Every term is normalised by the batch size B (one box per sample) and
returned multiplied by its weight, so the training objective is the plain sum of the returned dict's values.
"""
import math
from typing import Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

LOSS_WEIGHTS = {
    "loss_bbox": 2.0,
    "loss_giou": 2.0,
    "loss_contrastive": 1.0,
    "loss_align_focal": 20.0,
    "loss_align_dice": 2.0,
    "loss_seg_focal": 20.0,
    "loss_seg_dice": 2.0,
}

# Official loss-dict key -> ours (the official code spells the alignment focal term "algin").
OFFICIAL_LOSS_NAMES = {
    "loss_bbox": "loss_bbox",
    "loss_giou": "loss_giou",
    "loss_contrastive": "loss_contrastive",
    "loss_algin_focal": "loss_align_focal",
    "loss_align_dice": "loss_align_dice",
    "loss_seg_focal": "loss_seg_focal",
    "loss_seg_dice": "loss_seg_dice",
}

# Auxiliary term -> the model output it reads, in the order the terms are computed.
AUX_LOSSES = {"contrastive": "logits_per_text", "token_alignment": "token_map", "segmentation": "seg_map"}

# Training flag (argparse destination) -> the auxiliary term it switches on.
AUX_FLAGS = {"use_contrastive_loss": "contrastive", "use_rtcc_constrain_loss": "token_alignment",
             "use_mask_loss": "segmentation"}


def focal_loss(logits: Tensor, targets: Tensor, num_boxes: int) -> Tensor:
    """Sigmoid focal loss (RetinaNet, alpha 0.25, gamma 2), normalised as the official code does.

    Args:
        logits: [B, N] per-element logits.
        targets: [B, N] float 0/1 labels.
        num_boxes: normaliser (the batch size).
    Returns:
        scalar: per-sample mean over N, summed over B, divided by num_boxes.
    """
    return sigmoid_focal_loss(logits, targets, reduction="none").mean(1).sum() / num_boxes


def dice_loss(logits: Tensor, targets: Tensor, num_boxes: int) -> Tensor:
    """Soft DICE loss with +1 smoothing on numerator and denominator (torchvision has no dice loss).

    Args:
        logits: [B, ...] logits, flattened per sample.
        targets: [B, N] float 0/1 labels, N = number of elements per sample of ``logits``.
        num_boxes: normaliser (the batch size).
    Returns:
        scalar: sum over B of 1 - (2 |p t| + 1) / (|p| + |t| + 1), divided by num_boxes.
    """
    prob = logits.sigmoid().flatten(1)
    numerator = 2 * (prob * targets).sum(1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


def clip_loss(logits_per_text: Tensor) -> Tensor:
    """Symmetric cross-entropy of a [B, B] similarity matrix whose matches are on the diagonal.

    Our own because torchvision has no contrastive loss; it is two calls of F.cross_entropy.
    """
    labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    text_loss = F.cross_entropy(logits_per_text, labels)
    image_loss = F.cross_entropy(logits_per_text.t(), labels)
    return (text_loss + image_loss) / 2.0


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of box i of boxes1 [B, 4] with box i of boxes2 [B, 4], both xyxy -> [B].

    Each box is passed as a set of one ([B, 1, 4]), so torchvision's pairwise GIoU returns [B, 1, 1]:
    no [B, B] matrix, and no host sync (generalized_box_iou_loss indexes with a boolean mask).
    """
    return generalized_box_iou(boxes1[:, None], boxes2[:, None])[:, 0, 0]


def _mask_as_b1hw(obj_mask: Tensor) -> Tensor:
    """GT mask [B, H, W] or [B, 1, H, W] (any dtype, 0/1) -> float [B, 1, H, W]."""
    if obj_mask.dim() == 3:
        obj_mask = obj_mask[:, None]
    if obj_mask.dim() != 4 or obj_mask.shape[1] != 1:
        raise ValueError(f"obj_mask must be [B, H, W] or [B, 1, H, W], got {tuple(obj_mask.shape)}")
    return obj_mask.float()


def _patch_grid_side(num_patches: int) -> int:
    """Side P of a square P x P patch grid with num_patches cells."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"token_map has {num_patches} entries per sample, not a square patch grid")
    return side


class GroundingCriterion(nn.Module):
    """HiVG's weighted loss terms, in the style of DETR's SetCriterion (one box per sample, so no matching).

    Built once with its weights and auxiliary terms. Every call computes the box terms and exactly those
    auxiliary terms, and raises if the model did not produce an output one of them reads; model outputs no
    term reads are ignored. Nothing reads a tensor's value on the host, so a call never syncs the device,
    and non-finite predictions give non-finite losses (the trainer's stop) instead of an exception.
    """

    def __init__(self, aux_losses: Iterable[str] = (), weights: Optional[Mapping[str, float]] = None):
        """
        Args:
            aux_losses: auxiliary terms to compute, a subset of AUX_LOSSES
                ('contrastive', 'token_alignment', 'segmentation').
            weights: loss key -> weight, overriding LOSS_WEIGHTS (the official values) key by key.
        """
        super().__init__()
        requested = set(aux_losses)
        if requested - set(AUX_LOSSES):
            raise ValueError(f"unknown auxiliary losses {sorted(requested - set(AUX_LOSSES))}; "
                             f"choose from {list(AUX_LOSSES)}")
        if set(weights or {}) - set(LOSS_WEIGHTS):
            raise ValueError(f"unknown loss weights {sorted(set(weights) - set(LOSS_WEIGHTS))}; "
                             f"choose from {list(LOSS_WEIGHTS)}")
        self.aux_losses = tuple(name for name in AUX_LOSSES if name in requested)
        self.weights = {**LOSS_WEIGHTS, **(weights or {})}

    def extra_repr(self) -> str:
        return f"aux_losses={self.aux_losses}, weights={self.weights}"

    def forward(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Weighted loss terms of one batch; the training loss is ``sum(losses.values())``.

        Args:
            outputs: the model's dict: 'pred_box' [B, 4] (cx, cy, w, h), normalised to the padded input,
                and what the auxiliary terms read: 'logits_per_text' [B, B] (text-to-image CLIP logits),
                'token_map' [B, P * P] (patch alignment logits), 'seg_map' [B, 1, h, w] (mask logits).
                Any float dtype: they are cast to float32 here (the trainer runs under bf16 autocast).
            targets: 'boxes' [B, 4] (cx, cy, w, h), normalised; 'obj_masks' [B, H, W] or [B, 1, H, W],
                0/1 GT object mask at input resolution.
        Returns:
            'loss_bbox', 'loss_giou' and the auxiliary terms' keys -> scalar tensors, already weighted.
        Raises:
            ValueError: an output an auxiliary term reads is missing, or a tensor has the wrong layout.
        """
        needed = {name: AUX_LOSSES[name] for name in self.aux_losses}
        flags = {term: flag for flag, term in AUX_FLAGS.items()}
        missing = [f"'{key}' (for the {name} loss, --{flags[name]})" for name, key in needed.items()
                   if key not in outputs]
        if missing:
            raise ValueError(f"the model output has no {', '.join(missing)}; it has {sorted(outputs)}. Build the "
                             "model with that head, or the criterion without that loss")
        # float32 whatever the autocast dtype, as the official losses run in fp32
        out = {key: outputs[key].float() for key in ("pred_box", *needed.values())}
        tgt = {"boxes": targets["boxes"], "obj_masks": _mask_as_b1hw(targets["obj_masks"])}
        losses = self.loss_boxes(out, tgt)
        for name in self.aux_losses:
            losses.update(getattr(self, f"loss_{name}")(out, tgt))
        return {key: value * self.weights[key] for key, value in losses.items()}

    def loss_boxes(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """L1 and GIoU of 'pred_box' [B, 4] against 'boxes' [B, 4], both (cx, cy, w, h): each summed over B, / B."""
        pred, gt = outputs["pred_box"], targets["boxes"]
        num_boxes = pred.shape[0]
        l1 = F.l1_loss(pred, gt, reduction="none")
        giou = paired_generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(gt, "cxcywh", "xyxy"))
        return {"loss_bbox": l1.sum() / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes}

    def loss_contrastive(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Symmetric CLIP cross-entropy of 'logits_per_text' [B, B]."""
        return {"loss_contrastive": clip_loss(outputs["logits_per_text"])}

    def loss_token_alignment(self, outputs: Mapping[str, Tensor],
                             targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Focal + dice of 'token_map' [B, P * P] against 'obj_masks' [B, 1, H, W] nearest-resized to P x P
        and thresholded at 0.5."""
        token_map = outputs["token_map"]
        num_boxes = token_map.shape[0]
        side = _patch_grid_side(token_map.shape[-1])
        target = F.interpolate(targets["obj_masks"], (side, side), mode="nearest")[:, 0] > 0.5
        target = target.flatten(1).float()
        logits = token_map.flatten(1)
        return {"loss_align_focal": focal_loss(logits, target, num_boxes),
                "loss_align_dice": dice_loss(logits, target, num_boxes)}

    def loss_segmentation(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Focal + dice of 'seg_map' [B, 1, h, w], bilinearly resized to the GT mask 'obj_masks' [B, 1, H, W]."""
        seg_map, mask = outputs["seg_map"], targets["obj_masks"]
        if seg_map.dim() != 4 or seg_map.shape[1] != 1:
            raise ValueError(f"seg_map must be [B, 1, h, w], got {tuple(seg_map.shape)}")
        num_boxes = seg_map.shape[0]
        logits = F.interpolate(seg_map, size=mask.shape[-2:], mode="bilinear", align_corners=False).flatten(1)
        target = mask.flatten(1)
        return {"loss_seg_focal": focal_loss(logits, target, num_boxes),
                "loss_seg_dice": dice_loss(logits, target, num_boxes)}


def build_criterion(args) -> GroundingCriterion:
    """The criterion of a training run: the auxiliary terms of its flags (AUX_FLAGS), the official weights.

    The only reader of the argparse namespace in this module; a flag missing from it counts as off.
    """
    return GroundingCriterion(aux_losses=[term for flag, term in AUX_FLAGS.items() if getattr(args, flag, False)])
