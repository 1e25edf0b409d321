"""Pictures of predictions: boxes with their expressions, masks, [REG] attention / token-alignment heat maps,
and evaluation samples (prediction, ground truth, IoU). Boxes reach pixels of the original image through
datasets.transforms.Letterbox. Only numpy and PIL: the colour map is implemented here.
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from datasets.collate import Collate
from datasets.grounding import Grounding
from datasets.transforms import Letterbox

CYAN = (0, 255, 255)
GREEN = (0, 255, 0)
# Box colours of predict.py, one per expression (cycled).
PALETTE = ((0, 255, 255), (255, 64, 255), (255, 220, 0), (255, 96, 64), (64, 160, 255), (160, 255, 64),
           (255, 160, 200), (255, 255, 255))
# 'jet'-like colour map: anchor positions and RGB values in [0, 1].
_JET_X = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_JET_RGB = np.array([[0.0, 0.0, 0.5], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0],
                     [0.5, 0.0, 0.0]])


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB [..., 3] of a jet-like colour map (blue low, red high)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _JET_X, _JET_RGB[:, c]) for c in range(3)], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


def heatmap_to_image(heat: np.ndarray, crop_box: Sequence[int], frame_size: int, *,
                     image_size: Tuple[int, int]) -> np.ndarray:
    """A [gh, gw] map over the padded frame -> [H, W] float32 over the original image: bilinear
    upsampling to frame_size x frame_size, crop of the image region, bilinear resize to image_size (w, h)."""
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heat map must be [gh, gw], got shape {heat.shape}")
    frame = Image.fromarray(np.ascontiguousarray(heat)).resize((frame_size, frame_size), Image.BILINEAR)  # mode F
    region = frame.crop(tuple(int(c) for c in crop_box)).resize(tuple(image_size), Image.BILINEAR)
    return np.asarray(region, dtype=np.float32)


def overlay_heatmap(image: Image.Image, heat: np.ndarray, crop_box: Sequence[int], *, frame_size: int,
                    alpha: float = 0.5, normalize: bool = True) -> Image.Image:
    """Blend a [gh, gw] map of the padded frame over `image` (RGB, the original size).

    `crop_box` is the image's region of the padded frame (Letterbox.crop_box) and `frame_size` its side S.
    With `normalize` the map is stretched to [0, 1] over the image region (attention weights are small
    numbers that sum to 1); otherwise values are taken as already in [0, 1] (e.g. sigmoid probabilities).
    """
    img = image.convert("RGB")
    values = heatmap_to_image(heat, crop_box, frame_size, image_size=img.size)
    if normalize:
        lo, hi = float(values.min()), float(values.max())
        values = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    colour = colormap(values).astype(np.float32)
    base = np.asarray(img, dtype=np.float32)
    return Image.fromarray(np.round((1 - alpha) * base + alpha * colour).clip(0, 255).astype(np.uint8))


def overlay_masks(image: Image.Image, masks: Sequence[np.ndarray], *, colours: Sequence[Tuple[int, int, int]],
                  alpha: float = 0.5) -> Image.Image:
    """`image` (RGB) with each [H, W] bool mask of its size blended in its colour (later masks over earlier
    ones); pixels outside every mask keep their values. `image` itself is left unchanged."""
    img = image.convert("RGB")
    picture = np.asarray(img, dtype=np.float32).copy()
    for mask, colour in zip(masks, colours):
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != picture.shape[:2]:
            raise ValueError(f"mask of shape {mask.shape} for an image of {img.width}x{img.height}: give masks "
                             "of the image's [height, width]")
        picture[mask] = (1 - alpha) * picture[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return Image.fromarray(np.round(picture).clip(0, 255).astype(np.uint8))


def _font(image_size: Tuple[int, int]):
    size = max(8, round(min(image_size) / 32))
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _width(image_size) -> int:
    return max(1, round(min(image_size) / 200))


def _wrap(draw, text: str, font, *, width: int) -> List[str]:
    """`text` in lines no wider than `width` pixels (a word longer than that gets a line of its own)."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines or [""]


def enlarge(image: Image.Image, min_side: int) -> Tuple[Image.Image, int]:
    """A small image enlarged by the integer factor k (nearest neighbour) that brings its long side to at least
    `min_side`, so boxes and captions drawn on it stay readable; returns (picture, k), k = 1 if big enough."""
    k = max(1, -(-min_side // max(image.size)))
    if k == 1:
        return image, 1
    return image.resize((image.width * k, image.height * k), Image.NEAREST), k


def _captioned(img: Image.Image, captions: Sequence[Tuple[Optional[Tuple[int, int, int]], str]]) -> Image.Image:
    """`img` above a black strip holding each caption wrapped to the strip's width, behind a swatch of its
    colour when it has one. The strip is at least 320 px wide, so a caption never covers the picture."""
    W, H = img.size
    strip_w = max(W, 320)
    font = _font((strip_w, max(H, 320)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 3
    swatch = line_h - 3
    blocks = [(colour, _wrap(probe, text, font, width=strip_w - 8 - (swatch + 4 if colour else 0)))
              for colour, text in captions]
    out = Image.new("RGB", (strip_w, H + 6 + line_h * sum(len(lines) for _, lines in blocks)), (0, 0, 0))
    out.paste(img, (0, 0))
    draw = ImageDraw.Draw(out)
    y = H + 3
    for colour, lines in blocks:
        x = 4
        if colour:
            draw.rectangle([x, y + 1, x + swatch - 1, y + swatch], fill=colour)
            x += swatch + 4
        for line in lines:
            draw.text((x, y), line, fill=(255, 255, 255), font=font)
            y += line_h
    return out


def draw_boxes(image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str], *,
               colours: Optional[Sequence[Tuple[int, int, int]]] = None, min_side: int = 256) -> Image.Image:
    """The image (enlarged when its long side is under `min_side`) with every xyxy box (pixels of `image`)
    outlined in its colour, and below it each label behind a swatch of its box's colour."""
    img, k = enlarge(image.convert("RGB"), min_side)
    img = img.copy() if k == 1 else img        # never draw on the caller's image
    draw = ImageDraw.Draw(img)
    colours = colours or [PALETTE[i % len(PALETTE)] for i in range(len(boxes))]
    for box, colour in zip(boxes, colours):
        draw.rectangle([float(c) * k for c in box], outline=colour, width=_width(img.size))
    return _captioned(img, list(zip(colours, labels)))


def draw_prediction(image: Image.Image, pred_xyxy: Sequence[float], gt_xyxy: Sequence[float], *, text: str,
                    iou: float, min_side: int = 256, mask: Optional[np.ndarray] = None) -> Image.Image:
    """Evaluation picture: the ground truth (green) and the prediction (cyan) on the image, and below it
    a caption strip with the expression and the IoU. Boxes are xyxy pixels of `image`; `mask`, the predicted
    [H, W] bool mask of the segmentation head, is tinted cyan. An image whose long side is under `min_side` is
    first enlarged by an integer factor (nearest neighbour)."""
    if mask is not None:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        pixels[mask] = 0.55 * pixels[mask] + 0.45 * np.float32(CYAN)
        image = Image.fromarray(pixels.round().astype(np.uint8))
    img, k = enlarge(image.convert("RGB"), min_side)
    img = img.copy() if k == 1 else img
    draw = ImageDraw.Draw(img)
    draw.rectangle([float(c) * k for c in gt_xyxy], outline=GREEN, width=_width(img.size))
    draw.rectangle([float(c) * k for c in pred_xyxy], outline=CYAN, width=_width(img.size))
    pred = "pred box and mask" if mask is not None else "pred"
    caption = f"{text}  |  IoU {iou:.2f} ({'hit' if iou >= 0.5 else 'miss'})  |  {pred} cyan, gt green"
    return _captioned(img, [(None, caption)])


def _evenly(group: Sequence[int], m: int) -> List[int]:
    """m members of `group` evenly spaced (the middle of m equal parts); all of it when m >= len."""
    L = len(group)
    if m >= L:
        return list(group)
    return [group[(2 * k + 1) * L // (2 * m)] for k in range(m)]


def select_for_visualization(ious: Sequence[float], n: int, threshold: float = 0.5) -> List[int]:
    """Indices of n samples to draw, deterministically: half hits (IoU >= threshold), half misses (the
    odd one is a hit), each evenly spaced over its group in index order; a short group is filled up from
    the other. Sorted ascending; min(n, len(ious)) indices."""
    n = max(0, min(int(n), len(ious)))
    hits = [i for i, v in enumerate(ious) if v >= threshold]
    misses = [i for i, v in enumerate(ious) if not v >= threshold]   # NaN counts as a miss
    n_miss = min(n // 2, len(misses))
    n_hit = min(n - n_miss, len(hits))
    n_miss = n - n_hit
    return sorted(_evenly(hits, n_hit) + _evenly(misses, n_miss))


@torch.no_grad()
def save_eval_pictures(model, dataset, ious: Sequence[float], *, n: int, out_dir, device, prefix: str = "",
                       batch_size: int = 16) -> List[Path]:
    """Draw n samples of an evaluated split (chosen by select_for_visualization) into out_dir.

    `dataset` is a datasets.refer.GroundingDataset with the eval transform, `ious` the per-sample IoUs
    in dataset order. The selected samples are run through `model` again; prediction and ground truth
    are drawn in pixels of the original image. Files: <prefix>_<index>_<hit|miss>.png. Returns the paths.
    """
    chosen = select_for_visualization(ious, n)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inner = getattr(model, "module", model)  # DistributedDataParallel or the model itself
    model.eval()
    paths = []
    for start in range(0, len(chosen), batch_size):
        idx = chosen[start:start + batch_size]
        records = [dataset[i] for i in idx]
        batch = Collate(inner.context_length)(records).to(device)
        heads = ["box", "seg_map"] if "seg_map" in inner.outputs else ["box"]    # the head's mask, tinted
        out = model(batch.images, batch.pixel_mask, batch.ids, outputs=heads)
        pred = out["pred_box"].float().cpu()
        for k, (i, record) in enumerate(zip(idx, records)):
            ref = dataset.refs[i]
            with Image.open(dataset.image_path(ref)) as im:
                image = im.convert("RGB")
            lb = Letterbox.of(image.width, image.height, inner.image_size)
            pred_xyxy = lb.to_original(pred[k]).tolist()
            mask = lb.mask_to_original(out["seg_map"][k, 0]) if "seg_map" in out else None
            picture = draw_prediction(image, pred_xyxy, ref.box_xyxy, text=record.phrase, iou=float(ious[i]),
                                      mask=mask)
            path = out_dir / f"{prefix + '_' if prefix else ''}{i:06d}_{'hit' if ious[i] >= 0.5 else 'miss'}.png"
            picture.save(path)
            paths.append(path)
    return paths


def heat_pictures(image: Image.Image, pred: Grounding, text: str, *, colour,
                  min_side: int = 256) -> Dict[str, Image.Image]:
    """The heat-map pictures of one prediction (those computed), keyed 'attn' / 'tokmap', drawn as draw_boxes."""
    lb = pred.letterbox
    pics = {}
    if pred.attention is not None:
        pics["attn"] = overlay_heatmap(image, pred.attention, lb.crop_box, frame_size=lb.size)
    if pred.token_map is not None:
        prob = 1.0 / (1.0 + np.exp(-pred.token_map.astype(np.float64)))
        pics["tokmap"] = overlay_heatmap(image, prob, lb.crop_box, frame_size=lb.size, normalize=False)
    return {k: draw_boxes(v, [pred.box_xyxy], [text], colours=[colour], min_side=min_side) for k, v in pics.items()}
