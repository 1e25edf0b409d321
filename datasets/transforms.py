"""Train and eval transforms of a grounding sample (official HiVG behaviour).

Every transform maps a :class:`Record` to a :class:`Record`. Until
:class:`NormalizeAndPad` the image is a PIL image, ``box`` is [4] float xyxy in
pixels of that image and ``obj_mask`` is a [H, W] bool numpy array aligned with it.
:class:`NormalizeAndPad` produces the model's view: a [3, S, S] float image, the
box as normalised (cx, cy, w, h) in the padded frame, a [S, S] float 0/1 object
mask and a [S, S] int32 padding mask (1 on padding).

Randomness comes from Python's ``random`` module only, which PyTorch's DataLoader
seeds differently in every worker. Pixel work is done in numpy (single-threaded) and
turned into tensors at the end, so loading in the main process does not compete with
the training step for torch's intra-op threads.

Images are decoded fully before the first resize, as the authors' loader does. With
``fast_jpeg`` (training only, ``--fast_jpeg``) a JPEG that arrives not yet decoded is
instead decoded as a reduced-size draft (DCT scaling by 1/2, 1/4 or 1/8, never below
the target size): faster, but other pixels than the authors' (docs/method.md).
"""
import random
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter
from torchvision.ops import box_convert

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPATIAL_WORDS = ("left", "right", "top", "bottom", "middle")


@dataclass
class Record:
    """One sample on its way through the transforms (see the module docstring for the stages).

    image: PIL image, then [3, S, S] float32 after NormalizeAndPad.
    box: [4] float32, xyxy pixels; after NormalizeAndPad normalised (cx, cy, w, h).
    phrase: the referring expression (lower-cased by the dataset).
    obj_mask: [H, W] bool numpy array, then [S, S] float32 0/1 tensor after NormalizeAndPad.
    pixel_mask: None, then [S, S] int32 after NormalizeAndPad, 1 on padding.
    image_file: the image's file name, for reporting.
    original_mask: None, or in evaluation splits the [H, W] bool numpy ground-truth mask of the original image,
        left alone by the transforms (mask metrics are computed at the original resolution).
    """
    image: object
    box: torch.Tensor
    phrase: str
    obj_mask: object
    pixel_mask: Optional[torch.Tensor] = None
    image_file: str = ""
    original_mask: Optional[np.ndarray] = None


def resize_image(img: Image.Image, size_wh, fast_jpeg: bool = False) -> Image.Image:
    """Bilinear resize to (w, h) as torchvision does for PIL images. With `fast_jpeg` a JPEG not yet decoded
    is decoded in draft mode, which changes `img` itself: only for images the caller opened for this."""
    if fast_jpeg and img.format == "JPEG" and getattr(img, "tile", None):    # not decoded yet
        img.draft("RGB", tuple(size_wh))
    return img.convert("RGB").resize(tuple(size_wh), Image.BILINEAR)


def resize_mask(mask: np.ndarray, size_hw) -> np.ndarray:
    """Nearest-neighbour resize of a [H, W] array, with the index rule of F.interpolate(mode='nearest')."""
    def index(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)
    return mask[index(mask.shape[0], size_hw[0])[:, None], index(mask.shape[1], size_hw[1])[None, :]]


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, record: Record) -> Record:
        for t in self.transforms:
            record = t(record)
        return record


class RandomResize:
    """Resize so that the long (or short) side equals a size drawn from ``sizes``.

    ratio = size / side, new size (round(w * ratio), round(h * ratio)), box * ratio. `fast_jpeg`: see
    resize_image.
    """

    def __init__(self, sizes, long_side: bool = True, fast_jpeg: bool = False):
        self.sizes = list(sizes)
        self.long_side = long_side
        self.fast_jpeg = fast_jpeg

    def __call__(self, record: Record) -> Record:
        w, h = record.image.size
        size = random.choice(self.sizes)
        ratio = size / float(max(h, w) if self.long_side else min(h, w))
        new_w, new_h = round(w * ratio), round(h * ratio)
        record.image = resize_image(record.image, (new_w, new_h), self.fast_jpeg)
        record.box = record.box * ratio
        record.obj_mask = resize_mask(record.obj_mask, (new_h, new_w))
        return record


CROP_RULES = ("official", "box")


class RandomSizeCrop:
    """Crop a random region of side [min_size, max_size]; up to ``max_try`` draws.

    Which draw is kept (``rule``, docs/method.md):
      official: the box's centre x exceeds the crop's top (a row) and its centre y the crop's left (a
                column): the authors' code compares x with the top and y with the left;
      box:      the crop's origin lies strictly above-left of the box's top-left corner.
    The box is clipped to the crop; when no draw qualifies the record is returned unchanged.
    """

    def __init__(self, min_size: int, max_size: int, max_try: int = 20, rule: str = "official"):
        if rule not in CROP_RULES:
            raise ValueError(f"crop rule must be one of {', '.join(CROP_RULES)}, got {rule!r}")
        self.min_size = min_size
        self.max_size = max_size
        self.max_try = max_try
        self.rule = rule

    def draw_region(self, img_w: int, img_h: int) -> Tuple[int, int, int, int]:
        """(top, left, h, w) of one candidate crop."""
        w = random.randint(self.min_size, min(img_w, self.max_size))
        h = random.randint(self.min_size, min(img_h, self.max_size))
        top = random.randint(0, img_h - h)
        left = random.randint(0, img_w - w)
        return top, left, h, w

    def accepts(self, box: torch.Tensor, top: int, left: int) -> bool:
        if self.rule == "official":
            centre = (box[:2] + box[2:]) / 2.0     # float32, as the authors compute it
            return float(centre[0]) > top and float(centre[1]) > left
        return float(box[0]) > left and float(box[1]) > top

    def __call__(self, record: Record) -> Record:
        img_w, img_h = record.image.size
        for _ in range(self.max_try):
            top, left, h, w = self.draw_region(img_w, img_h)
            if self.accepts(record.box, top, left):
                record.image = record.image.crop((left, top, left + w, top + h))
                box = record.box - torch.tensor([left, top, left, top], dtype=torch.float32)
                box = torch.min(box.reshape(2, 2), torch.tensor([w, h], dtype=torch.float32))
                record.box = box.clamp(min=0).reshape(4)
                record.obj_mask = record.obj_mask[top:top + h, left:left + w]
                return record
        return record


class RandomSelect:
    """Apply ``first`` or, with probability p, ``second``; always ``first`` for spatial phrases.

    A phrase is spatial when it contains (as a substring) one of SPATIAL_WORDS.
    """

    def __init__(self, first, second, p: float = 0.5):
        self.first = first
        self.second = second
        self.p = p

    def __call__(self, record: Record) -> Record:
        if any(word in record.phrase for word in SPATIAL_WORDS):
            return self.first(record)
        if random.random() < self.p:
            return self.second(record)
        return self.first(record)


class ColorJitter:
    """With probability p, PIL brightness, contrast and saturation jitter in random order."""

    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.4, p: float = 0.8):
        self.enhancers = [(ImageEnhance.Brightness, brightness), (ImageEnhance.Contrast, contrast),
                          (ImageEnhance.Color, saturation)]
        self.p = p

    def __call__(self, record: Record) -> Record:
        if random.random() < self.p:
            for i in random.sample(range(3), 3):
                enhancer, strength = self.enhancers[i]
                factor = random.uniform(1 - strength, 1 + strength)
                record.image = enhancer(record.image).enhance(factor)
        return record


class GaussianBlur:
    """With probability p, PIL Gaussian blur of radius drawn from [sigma_min, sigma_max]."""

    def __init__(self, p: float, sigma=(0.1, 2.0)):
        self.p = p
        self.sigma = sigma

    def __call__(self, record: Record) -> Record:
        if random.random() < self.p:
            radius = random.uniform(*self.sigma)
            record.image = record.image.filter(ImageFilter.GaussianBlur(radius=radius))
        return record


class NormalizeAndPad:
    """ImageNet-normalise, then zero-pad to size x size.

    Offsets: uniform in [0, size - h] x [0, size - w] with ``translate``, else centred as
    top = round(dh / 2 - 0.1), left = round(dw / 2 - 0.1) with Python's round.
    """

    def __init__(self, size: int, translate: bool = False):
        self.size = size
        self.translate = translate

    def __call__(self, record: Record) -> Record:
        img = np.asarray(record.image.convert("RGB"), dtype=np.float32) / 255.0          # [h, w, 3]
        img = ((img - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)).transpose(2, 0, 1)
        h, w = img.shape[1:]
        dh, dw = self.size - h, self.size - w
        if self.translate:
            top, left = random.randint(0, dh), random.randint(0, dw)
        else:
            top, left = round(dh / 2.0 - 0.1), round(dw / 2.0 - 0.1)

        out = np.zeros((3, self.size, self.size), dtype=np.float32)
        out[:, top:top + h, left:left + w] = img
        pixel_mask = np.ones((self.size, self.size), dtype=np.int32)
        pixel_mask[top:top + h, left:left + w] = 0
        obj_mask = np.zeros((self.size, self.size), dtype=np.float32)
        obj_mask[top:top + h, left:left + w] = record.obj_mask

        x0, y0, x1, y1 = (record.box + torch.tensor([left, top, left, top], dtype=torch.float32)).tolist()
        box = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dtype=torch.float32)
        record.image = torch.from_numpy(out)
        record.pixel_mask = torch.from_numpy(pixel_mask)
        record.obj_mask = torch.from_numpy(obj_mask)
        record.box = box / self.size
        return record


def make_transforms(imsize: int, train: bool, aug_scale: bool = False, aug_crop: bool = False,
                    aug_blur: bool = False, aug_translate: bool = False, crop_rule: str = "official",
                    fast_jpeg: bool = False) -> Compose:
    """The official pipelines.

    Train: [long side to imsize - 32 i (i = 0..6 with aug_scale, sizes <= 0 dropped; else imsize)] or, with p = 0.5
    when aug_crop and never for spatial phrases, [short side to 400/500/600, random crop of side
    384-600 kept by `crop_rule`, long side as before]; colour jitter (p 0.8); Gaussian blur (p 0.5 with
    aug_blur); normalise and pad (random offset with aug_translate). No horizontal flip. `fast_jpeg`: JPEG
    draft decoding (resize_image).
    Eval: long side to imsize, normalise, centred pad; images always decoded fully.
    """
    if not train:
        return Compose([RandomResize([imsize]), NormalizeAndPad(imsize)])
    scales = [imsize - 32 * i for i in range(7) if imsize - 32 * i > 0] if aug_scale else [imsize]
    return Compose([
        RandomSelect(
            RandomResize(scales, fast_jpeg=fast_jpeg),
            Compose([RandomResize([400, 500, 600], long_side=False, fast_jpeg=fast_jpeg),
                     RandomSizeCrop(384, 600, rule=crop_rule),
                     RandomResize(scales)]),
            p=0.5 if aug_crop else 0.0),
        ColorJitter(0.4, 0.4, 0.4),
        GaussianBlur(p=0.5 if aug_blur else 0.0),
        NormalizeAndPad(imsize, translate=aug_translate),
    ])


def build_transforms(args, train: bool) -> Compose:
    """make_transforms from args.imsize, aug_scale, aug_crop, aug_blur, aug_translate, crop_rule and (train
    only) fast_jpeg; a run saved before crop_rule existed gets the default."""
    return make_transforms(args.imsize, train, aug_scale=args.aug_scale, aug_crop=args.aug_crop,
                           aug_blur=args.aug_blur, aug_translate=args.aug_translate,
                           crop_rule=getattr(args, "crop_rule", "official"),
                           fast_jpeg=train and getattr(args, "fast_jpeg", False))


@dataclass(frozen=True)
class Letterbox:
    """Where an image of width x height lands in the S x S input of the eval transform.

    The eval transform resizes the long side to S with ratio = S / max(h, w), new size (round(w * ratio),
    round(h * ratio)), and pads centred with left = round(dw / 2 - 0.1), top = round(dh / 2 - 0.1)
    (dw = S - new_w, dh = S - new_h). A box goes through it as xyxy * ratio + (left, top), then normalised
    (cx, cy, w, h) / S; `to_original` inverts exactly that.
    """
    width: int
    height: int
    size: int
    ratio: float
    new_w: int
    new_h: int
    left: int
    top: int

    @classmethod
    def of(cls, width: int, height: int, size: int) -> "Letterbox":
        """Same arithmetic as RandomResize([size]) followed by NormalizeAndPad(size) (centred)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size {width}x{height} is empty")
        ratio = size / float(max(height, width))
        new_w, new_h = round(width * ratio), round(height * ratio)
        left, top = round((size - new_w) / 2.0 - 0.1), round((size - new_h) / 2.0 - 0.1)
        return cls(width=width, height=height, size=size, ratio=ratio, new_w=new_w, new_h=new_h, left=left, top=top)

    @property
    def crop_box(self) -> Tuple[int, int, int, int]:
        """The image's region of the padded frame, (x0, y0, x1, y1) in padded-frame pixels."""
        return self.left, self.top, self.left + self.new_w, self.top + self.new_h

    def to_original(self, boxes_cxcywh: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """Normalised (cx, cy, w, h) in the padded frame [..., 4] -> xyxy pixels of the original image
        (float64), clipped to the image unless `clip=False`."""
        xyxy = box_convert(torch.as_tensor(boxes_cxcywh).double(), "cxcywh", "xyxy") * self.size
        offset = torch.tensor([self.left, self.top, self.left, self.top], dtype=torch.float64)
        out = (xyxy - offset) / self.ratio
        if clip:
            limit = torch.tensor([self.width, self.height, self.width, self.height], dtype=torch.float64)
            out = torch.minimum(out.clamp(min=0), limit)
        return out

    def mask_to_original(self, logits: torch.Tensor, *, threshold: float = 0.5) -> np.ndarray:
        """Mask logits over the padded frame [h, w] (any resolution) -> [height, width] bool mask of the original
        image: bilinear resize to S x S, crop the letterbox padding away, bilinear resize to the image, then
        probability (sigmoid) > threshold. The mask never leaves the image."""
        if logits.dim() != 2:
            raise ValueError(f"mask logits must be [h, w], got {tuple(logits.shape)}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"mask threshold must lie in (0, 1), got {threshold}")
        x = logits.detach().float().cpu()[None, None]
        x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x0, y0, x1, y1 = self.crop_box
        x = torch.nn.functional.interpolate(x[:, :, y0:y1, x0:x1], size=(self.height, self.width),
                                            mode="bilinear", align_corners=False)
        return (torch.sigmoid(x[0, 0]) > threshold).numpy()
