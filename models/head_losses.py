"""Loss terms of the built-in heads, term for term the authors' ``trans_vg_loss`` (README.md, "Parity with the
authors' code"); their weights and flags are declared with the heads (models/heads.py).

Each function takes the head's outputs (float32) and the targets it reads and returns its terms unweighted,
normalised by the batch size B (one box per sample). Nothing reads a tensor's value on the host, so no call
syncs the device, and non-finite predictions give non-finite losses instead of an exception.
"""
import math
from typing import Dict, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss


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


def mask_as_b1hw(obj_mask: Tensor) -> Tensor:
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


def box_losses(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """L1 and GIoU of 'pred_box' [B, 4] against 'boxes' [B, 4], both (cx, cy, w, h): each summed over B, / B."""
    pred, gt = outputs["pred_box"], targets["boxes"]
    num_boxes = pred.shape[0]
    l1 = F.l1_loss(pred, gt, reduction="none")
    giou = paired_generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(gt, "cxcywh", "xyxy"))
    return {"loss_bbox": l1.sum() / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes}


def contrastive_losses(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Symmetric CLIP cross-entropy of 'logits_per_text' [B, B]."""
    return {"loss_contrastive": clip_loss(outputs["logits_per_text"])}


def token_alignment_target(obj_masks: Tensor, side: int) -> Tensor:
    """'obj_masks' [B, (1,) H, W] -> [B, side * side] float: nearest-resized to side x side (each patch reads
    its top-left pixel) and thresholded at 0.5."""
    target = F.interpolate(mask_as_b1hw(obj_masks), (side, side), mode="nearest")[:, 0] > 0.5
    return target.flatten(1).float()


def token_alignment_losses(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Focal + dice of 'token_map' [B, P * P] against token_alignment_target('obj_masks')."""
    token_map = outputs["token_map"]
    num_boxes = token_map.shape[0]
    target = token_alignment_target(targets["obj_masks"], _patch_grid_side(token_map.shape[-1]))
    logits = token_map.flatten(1)
    return {"loss_align_focal": focal_loss(logits, target, num_boxes),
            "loss_align_dice": dice_loss(logits, target, num_boxes)}


def segmentation_losses(outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Focal + dice of 'seg_map' [B, 1, h, w], bilinearly resized to the GT mask 'obj_masks' [B, (1,) H, W]."""
    seg_map, mask = outputs["seg_map"], mask_as_b1hw(targets["obj_masks"])
    if seg_map.dim() != 4 or seg_map.shape[1] != 1:
        raise ValueError(f"seg_map must be [B, 1, h, w], got {tuple(seg_map.shape)}")
    num_boxes = seg_map.shape[0]
    logits = F.interpolate(seg_map, size=mask.shape[-2:], mode="bilinear", align_corners=False).flatten(1)
    target = mask.flatten(1)
    return {"loss_seg_focal": focal_loss(logits, target, num_boxes),
            "loss_seg_dice": dice_loss(logits, target, num_boxes)}
