"""Training losses of HiVG (SPEC section 5), numerically matching the official ``trans_vg_loss``.

Every term is normalised by the batch size B (one box per sample) and returned already
multiplied by its weight from ``LOSS_WEIGHTS``, so the training objective is the plain sum
of the returned dict's values.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou

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


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_boxes: float,
                       alpha: float = 0.25, gamma: float = 2) -> Tensor:
    """Sigmoid focal loss (RetinaNet, https://arxiv.org/abs/1708.02002).

    Args:
        logits: [B, N] per-element logits.
        targets: [B, N] float 0/1 labels.
        num_boxes: normaliser (the batch size).
        alpha: weight of positives in (0, 1); a negative value disables the weighting.
        gamma: focusing exponent on (1 - p_t).
    Returns:
        scalar: per-sample mean over N, summed over B, divided by num_boxes.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


def dice_loss(logits: Tensor, targets: Tensor, num_boxes: float) -> Tensor:
    """Soft DICE loss with +1 smoothing on numerator and denominator.

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
    """Symmetric cross-entropy of a [B, B] similarity matrix whose matches are on the diagonal."""
    labels = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    text_loss = F.cross_entropy(logits_per_text, labels)
    image_loss = F.cross_entropy(logits_per_text.t(), labels)
    return (text_loss + image_loss) / 2.0


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


def box_losses(pred_box: Tensor, gt_box: Tensor) -> dict[str, Tensor]:
    """Weighted L1 and GIoU box losses.

    Args:
        pred_box: [B, 4] predicted (cx, cy, w, h), normalised.
        gt_box: [B, 4] target (cx, cy, w, h), normalised.
    Returns:
        {'loss_bbox', 'loss_giou'}: scalars, each summed over B, / B, times its weight.
    """
    num_boxes = pred_box.shape[0]
    l1 = F.l1_loss(pred_box, gt_box, reduction="none")
    giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(pred_box), box_cxcywh_to_xyxy(gt_box))
    return {
        "loss_bbox": (l1.sum() / num_boxes) * LOSS_WEIGHTS["loss_bbox"],
        "loss_giou": ((1 - giou).sum() / num_boxes) * LOSS_WEIGHTS["loss_giou"],
    }


def token_alignment_losses(token_map: Tensor, obj_mask: Tensor) -> dict[str, Tensor]:
    """Weighted focal + dice losses of the per-patch alignment logits.

    Args:
        token_map: [B, P * P] logits, one per patch.
        obj_mask: [B, 1, H, W] float 0/1 GT mask, nearest-resized to P x P and thresholded at 0.5.
    Returns:
        {'loss_align_focal', 'loss_align_dice'}.
    """
    num_boxes = token_map.shape[0]
    side = _patch_grid_side(token_map.shape[-1])
    target = F.interpolate(obj_mask, (side, side), mode="nearest")[:, 0] > 0.5
    target = target.flatten(1).float()
    logits = token_map.flatten(1)
    return {
        "loss_align_focal": sigmoid_focal_loss(logits, target, num_boxes) * LOSS_WEIGHTS["loss_align_focal"],
        "loss_align_dice": dice_loss(logits, target, num_boxes) * LOSS_WEIGHTS["loss_align_dice"],
    }


def segmentation_losses(seg_map: Tensor, obj_mask: Tensor) -> dict[str, Tensor]:
    """Weighted focal + dice losses of the mask logits, bilinearly resized to the GT mask size.

    Args:
        seg_map: [B, 1, h, w] mask logits.
        obj_mask: [B, 1, H, W] float 0/1 GT mask.
    Returns:
        {'loss_seg_focal', 'loss_seg_dice'}.
    """
    if seg_map.dim() != 4 or seg_map.shape[1] != 1:
        raise ValueError(f"seg_map must be [B, 1, h, w], got {tuple(seg_map.shape)}")
    num_boxes = seg_map.shape[0]
    logits = F.interpolate(seg_map, size=obj_mask.shape[-2:], mode="bilinear", align_corners=False)
    logits = logits.flatten(1)
    target = obj_mask.flatten(1)
    return {
        "loss_seg_focal": sigmoid_focal_loss(logits, target, num_boxes) * LOSS_WEIGHTS["loss_seg_focal"],
        "loss_seg_dice": dice_loss(logits, target, num_boxes) * LOSS_WEIGHTS["loss_seg_dice"],
    }


def grounding_losses(pred_box: Tensor, gt_box: Tensor, obj_mask: Tensor,
                     logits_per_text: Optional[Tensor] = None,
                     token_map: Optional[Tensor] = None,
                     seg_map: Optional[Tensor] = None) -> dict[str, Tensor]:
    """All HiVG loss terms, already weighted; the total loss is ``sum(losses.values())``.

    Args:
        pred_box: [B, 4] predicted (cx, cy, w, h), normalised to the padded input.
        gt_box: [B, 4] target (cx, cy, w, h), normalised.
        obj_mask: [B, H, W] or [B, 1, H, W] GT object mask, 0/1, at input resolution.
        logits_per_text: [B, B] text-to-image CLIP logits; adds 'loss_contrastive'.
        token_map: [B, P * P] patch alignment logits; adds 'loss_align_focal', 'loss_align_dice'.
        seg_map: [B, 1, h, w] mask logits; adds 'loss_seg_focal', 'loss_seg_dice'.
    Returns:
        dict of scalar tensors: 'loss_bbox', 'loss_giou' and the terms of the given heads.
    """
    mask = _mask_as_b1hw(obj_mask)
    losses = box_losses(pred_box, gt_box)
    if logits_per_text is not None:
        losses["loss_contrastive"] = clip_loss(logits_per_text) * LOSS_WEIGHTS["loss_contrastive"]
    if token_map is not None:
        losses.update(token_alignment_losses(token_map, mask))
    if seg_map is not None:
        losses.update(segmentation_losses(seg_map, mask))
    return losses
