"""The JSONL layout (--dataset jsonl): one JSON object per line, one file per split (README "Train on your own data").

    {"image": "dogs/001.jpg", "box": [12.5, 30, 200, 180.25], "text": "the dog on the left",
     "mask": [[x0, y0, x1, y1, ...], ...], "id": "001-a", "width": 640, "height": 480}

image: path under --data_root; box: [x0, y0, x1, y1] in pixels of the original image; text: the expression;
optional: mask (COCO polygons, or an RLE {"size": [h, w], "counts": ...}), id (unique in its file), width and
height (checked against the image). Numbers are read as written (decimals, not binary floats), so the width
x1 - x0 is exact: the box that trains is the COCO-based sets' truncation, x0' = int(x0), x1' = x0' + int(x1 - x0),
and a COCO [x, y, w, h] box written as [x, y, x + w, y + h] (datasets.convert does) trains as the authors'
loader reads it. Every error names the file and line.
"""
import json
from dataclasses import replace
from decimal import Context, Decimal
from typing import NamedTuple

from PIL import Image

from .fields import Ref, Where

KEYS = ("image", "box", "text", "mask", "id", "width", "height")
REQUIRED = ("image", "box", "text")
EXACT = Context(prec=100)   # differences and sums of written numbers, exact
MASK_FORMS = 'COCO polygons [[x0, y0, x1, y1, x2, y2, ...], ...] or an RLE {"size": [h, w], "counts": ...}'


class Line(NamedTuple):
    """One non-blank line of a JSONL file: its number (from 1) and text."""
    number: int
    text: str


def read(path: str, allow_unsafe: bool = False) -> list:
    """The non-blank lines of a JSONL split file as `Line`s (`allow_unsafe`: a pickle option, unused)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [Line(n, text) for n, text in enumerate(f, start=1) if text.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); save the file as UTF-8 JSON lines") from None


def number(value) -> bool:
    """A JSON number: an int (not a bool) or a finite decimal."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, Decimal) and
                                                                        value.is_finite())


def box_fields(box, where: Where) -> tuple:
    """(box_xyxy truncated, box_xywh floats) of a [x0, y0, x1, y1] list of JSON numbers."""
    if not isinstance(box, list) or len(box) != 4 or not all(map(number, box)):
        raise ValueError(f"{where}: 'box' must be four numbers [x0, y0, x1, y1] in pixels, got "
                         f"{json.dumps(box, default=str)}; fix the line")
    x0, y0, x1, y1 = (Decimal(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{where}: 'box' {[float(v) for v in box]} has x1 <= x0 or y1 <= y0; write the corners "
                         "as [left, top, right, bottom]")
    w, h = EXACT.subtract(x1, x0), EXACT.subtract(y1, y0)
    left, top = int(x0), int(y0)
    return (left, top, left + int(w), top + int(h)), tuple(float(v) for v in (x0, y0, w, h))


def check_mask(mask, where: Where):
    """The mask as stored: a polygon list (lists of flat xy numbers), or an RLE dict."""
    if isinstance(mask, dict):
        size = mask.get("size")
        if set(mask) == {"size", "counts"} and isinstance(size, list) and len(size) == 2 and \
                all(isinstance(v, int) and v > 0 for v in size) and isinstance(mask["counts"], (str, list)):
            return mask
    elif isinstance(mask, list) and all(isinstance(p, list) and len(p) % 2 == 0 and all(map(number, p))
                                        for p in mask):
        return [[float(v) for v in p] for p in mask]
    raise ValueError(f"{where}: 'mask' must be {MASK_FORMS}; fix it or drop the key")


def size_fields(obj: dict, where: Where):
    """(h, w) from 'width' and 'height', None without them."""
    given = [k for k in ("width", "height") if k in obj]
    if not given:
        return None
    if len(given) == 1 or not all(isinstance(obj[k], int) and not isinstance(obj[k], bool) and obj[k] > 0
                                  for k in given):
        raise ValueError(f"{where}: 'width' and 'height' go together, as positive integers (pixels); fix or drop "
                         "them")
    return obj["height"], obj["width"]


def parse(entry: Line, where: Where) -> Ref:
    where = replace(where, line=entry.number)
    try:
        obj = json.loads(entry.text, parse_float=Decimal)
    except ValueError as e:
        raise ValueError(f"{where}: not JSON ({e}); each line is one JSON object") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a {type(obj).__name__} where a JSON object belongs; each line is one object "
                         "{\"image\": ..., \"box\": ..., \"text\": ...}")
    missing = [k for k in REQUIRED if k not in obj]
    unknown = sorted(set(obj) - set(KEYS))
    if missing or unknown:
        wrong = f"missing key {', '.join(map(repr, missing))}" if missing else f"unknown key {', '.join(unknown)}"
        raise ValueError(f"{where}: {wrong}; a line has the keys image, box, text and optionally "
                         f"{', '.join(KEYS[3:])}")
    if not isinstance(obj["image"], str) or not obj["image"].strip():
        raise ValueError(f"{where}: 'image' must be a path under --data_root, got {obj['image']!r}")
    if not isinstance(obj["text"], str) or not obj["text"].strip():
        raise ValueError(f"{where}: 'text' is empty; write the referring expression, or drop the line")
    sample_id = obj.get("id")
    if sample_id is not None and (isinstance(sample_id, bool) or not isinstance(sample_id, (str, int))):
        raise ValueError(f"{where}: 'id' must be a string or an integer, got {sample_id!r}")
    box_xyxy, box_xywh = box_fields(obj["box"], where)
    mask = check_mask(obj["mask"], where) if "mask" in obj else None
    return Ref(image=obj["image"], folder=where.folder, box_xyxy=box_xyxy, box_xywh=box_xywh, phrase=obj["text"],
               size_hw=size_fields(obj, where), polygons=mask, source=where.source, entry=where.index,
               line=entry.number, sample_id=sample_id)


def image_size(path: str):
    """((h, w), None) of an image file read from its header, or (None, what is wrong)."""
    try:
        with Image.open(path) as img:
            return (img.height, img.width), None
    except FileNotFoundError:
        return None, "not found"
    except OSError as e:
        return None, f"cannot be read ({e})"


def problems(refs, image_path) -> list:
    """`file:line: problem; fix` for every duplicate id, missing or unreadable image, image whose size differs
    from the line's width/height or RLE size, and box wholly outside its image. `image_path(ref)`: its file."""
    found, first_line, sizes = [], {}, {}
    for ref in refs:
        at = f"{ref.source}:{ref.line}"
        if ref.sample_id is not None:
            key = (ref.source, ref.sample_id)
            if key in first_line:
                found.append(f"{at}: id {ref.sample_id!r} is on line {first_line[key]} too; give each line its own id")
            first_line.setdefault(key, ref.line)
        path = image_path(ref)
        if path not in sizes:
            sizes[path] = image_size(path)
        size, reason = sizes[path]
        if reason:
            found.append(f"{at}: image {path} {reason}; put it under --data_root or fix 'image'")
            continue
        given = {"width/height": ref.size_hw,
                 "the mask's RLE size": tuple(ref.polygons["size"]) if isinstance(ref.polygons, dict) else None}
        found += [f"{at}: {name} {hw[1]}x{hw[0]} differs from image {path}, {size[1]}x{size[0]}; fix the line"
                  for name, hw in given.items() if hw is not None and tuple(hw) != size]
        x0, y0, x1, y1 = ref.box_xyxy
        if x1 <= 0 or y1 <= 0 or x0 >= size[1] or y0 >= size[0]:
            found.append(f"{at}: the box lies wholly outside image {path} ({size[1]}x{size[0]}); fix the box (pixels "
                         "of that image)")
    return found

