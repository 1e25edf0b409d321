"""Ground referring expressions in images with a HiVG checkpoint (ours, or the authors' converted on load).

    python predict.py --checkpoint CKPT --image IMG --text "the man on the left" [--text ...] [--out OUT.png]
    python predict.py --checkpoint CKPT --image IMG --text "..." --heatmap [--token_map]
    python predict.py --checkpoint CKPT --image IMG --text "..." --mask
    python predict.py --checkpoint CKPT --jsonl requests.jsonl [--out_dir DIR] [--batch_size 16]
    python predict.py --onnx MODEL.onnx --image IMG --text "the man on the left"    # export.py's file

Prints one JSON line per expression on stdout: {"image", "text", "box_xyxy", "score"} with the box in pixels
of the original image (x0, y0, x1, y1, clipped to the image) and the token-alignment score of the box (for
models trained with the token-alignment loss; see models/api.py). With --image it also draws every box with its
expression on the image (same size as the image) and saves it to --out (default: <image stem>_hivg.png).

--heatmap overlays the [REG] token's attention over the visual tokens in the last fusion layer (averaged
over heads, renormalised over the patches) and --token_map the token-alignment map (sigmoid of the
per-patch logits); one picture per expression, <out stem>_attn_<k>.png / <out stem>_tokmap_<k>.png.
Attention weights are computed only when asked for.

--mask (models trained with --use_mask_loss) adds each expression's segmentation mask: drawn over the picture as
a translucent overlay in its box's colour, saved as <out stem>_mask_<k>.png (1-bit, the original image's size)
and carried by the JSON line as "mask", COCO RLE {"size": [h, w], "counts": str} (pycocotools.mask.decode
reads it back).

--jsonl reads lines {"image": PATH, "text": EXPRESSION} (relative paths are taken from the JSONL file's
folder, or from --image_root) and predicts them in batches; with --out_dir one picture per image
(<image stem>_hivg.png, all its expressions), the heat maps and the mask pictures.

The model is the checkpoint's, run through the Python API (models/api.py: LoRA merged, eval mode, the eval
transform of its input size, boxes mapped back through the exact inverse of that letterbox). The bridge cross-attention runs per sample (--bridge_attention per_sample) so a prediction does not
depend on the other expressions of its batch; for the authors' checkpoints this is their model run
one sample at a time.

--onnx runs a model exported by export.py through onnxruntime (utils/onnx_grounder.py) in place of
--checkpoint: the same transform and box read-out, no model code imported; boxes, and masks when it was
exported with the segmentation head (no --heatmap, --token_map or score); the bridge is the one it was
exported with.
"""
import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from datasets.grounding import Grounding, Prepared
from utils.distributed import resolve_device
from utils.errors import UserError, reports_errors
from utils.flags import add_device_arg, add_hf_clip_config_arg
from utils.visualize import draw_boxes, heat_pictures, overlay_masks

PROG = "predict.py"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(PROG, description="HiVG inference on images and referring expressions.",
                                     allow_abbrev=False)
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint",
                       help="a checkpoint of train_hivg.py / utils.checkpoint, or an official HiVG checkpoint")
    weights.add_argument("--onnx", help="a model exported by export.py, run through onnxruntime (boxes, masks)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="one image (with one or more --text)")
    src.add_argument("--jsonl", help='batch mode: a file of {"image": ..., "text": ...} lines')
    parser.add_argument("--text", action="append", help="a referring expression (repeat for several)")
    parser.add_argument("--out", help="picture of the boxes (--image mode; default <image stem>_hivg.png)")
    parser.add_argument("--out_dir", help="batch mode: folder for one picture per image and the heat maps")
    parser.add_argument("--image_root", help="batch mode: folder of relative image paths (default: the "
                                             "JSONL file's folder)")
    parser.add_argument("--heatmap", action="store_true",
                        help="also draw the [REG] token's attention over the patches (last fusion layer)")
    parser.add_argument("--token_map", action="store_true", help="also draw the token-alignment map")
    parser.add_argument("--mask", action="store_true",
                        help="also predict each expression's segmentation mask (models trained with "
                             "--use_mask_loss): overlaid on the picture, saved as PNG, COCO RLE in the JSON line")
    parser.add_argument("--batch_size", type=int, default=16)
    add_device_arg(parser)
    parser.add_argument("--bridge_attention", default="per_sample", choices=("per_sample", "official"),
                        help="per_sample: each expression alone (default); official: the authors' batch-mixing "
                             "reshape, predictions then depend on the batch")
    add_hf_clip_config_arg(parser)
    return parser


# ----------------------------------------------------------------------------------------- images

def open_image(path, what: str) -> Image.Image:
    """PIL image (header read, pixels decoded lazily) or a UserError naming `what` and the fix."""
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not an image file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{what} {path} cannot be read as an image ({e}); pass a JPEG/PNG/... file") from None


def load_rgb(path, what: str) -> Image.Image:
    """The whole image decoded, RGB (for drawing)."""
    img = open_image(path, what)
    try:
        with img:
            return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {path} cannot be decoded ({e}); replace the file") from None


def prepare_file(grounder, path, what: str) -> Prepared:
    img = open_image(path, what)
    try:
        return grounder.prepare(img)
    except (OSError, ValueError) as e:     # pixels are decoded inside the first resize
        raise UserError(f"{what} {path} cannot be decoded ({e}); replace the file") from None
    finally:
        img.close()


# ----------------------------------------------------------------------------------------- CLI

@dataclass(kw_only=True)
class Request:
    image: str          # as given
    path: Path          # resolved
    text: str
    where: str          # for messages


def check_text(text, where: str) -> str:
    if not isinstance(text, str):
        raise UserError(f"{where}: the text must be a string, got {text!r}")
    if not text.strip():
        raise UserError(f"{where}: the text is empty; give a referring expression, e.g. \"the man on the left\"")
    return text


def read_requests(jsonl: str, image_root: Optional[str]) -> List[Request]:
    path = Path(jsonl)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--jsonl {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--jsonl {path} cannot be read as UTF-8 text ({e})") from None
    root = Path(image_root) if image_root else path.parent
    requests = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--jsonl {path} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not JSON ({e}); each line must be "
                            '{"image": "path/to/image.jpg", "text": "the man on the left"}') from None
        if not isinstance(obj, dict) or "image" not in obj or "text" not in obj:
            raise UserError(f'{where} needs an object with "image" and "text" keys, got {line.strip()[:80]}')
        if not isinstance(obj["image"], str) or not obj["image"]:
            raise UserError(f'{where}: "image" must be a non-empty path string')
        text = check_text(obj["text"], where)
        image = Path(obj["image"])
        requests.append(Request(image=obj["image"], path=image if image.is_absolute() else root / image, text=text,
                                where=where))
    if not requests:
        raise UserError(f"--jsonl {path} has no requests")
    return requests


def save_picture(image: Image.Image, path: Path, flag: str) -> None:
    try:
        image.save(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {path} cannot be written ({e}); choose a writable path") from None


def heat_path(base: Path, kind: str, k: int) -> Path:
    return base.with_name(f"{base.stem}_{kind}_{k}{base.suffix}")


def coco_mask_module():
    """pycocotools.mask, or a UserError saying how to install it."""
    try:
        from pycocotools import mask
    except ImportError:
        raise UserError("--mask writes COCO RLE and needs pycocotools: pip install -r requirements.txt") from None
    return mask


def mask_rle(mask: np.ndarray) -> dict:
    """[h, w] bool mask -> COCO RLE {"size": [h, w], "counts": str} (pycocotools.mask.decode inverts it)."""
    rle = coco_mask_module().encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def json_line(req: Request, pred: Grounding, files: Dict[str, Path]) -> str:
    obj = {"image": req.image, "text": req.text, "box_xyxy": [round(v, 2) for v in pred.box_xyxy]}
    if pred.score is not None:
        obj["score"] = round(pred.score, 4)
    if pred.mask is not None:
        obj["mask"] = mask_rle(pred.mask)
    obj.update({f"{k}_picture": str(v) for k, v in files.items()})
    return json.dumps(obj)


def validate(opts, parser) -> None:
    if opts.image is not None:
        if not opts.text:
            parser.error("--image needs at least one --text \"referring expression\"")
        if opts.out_dir or opts.image_root:
            parser.error("--out_dir and --image_root are for --jsonl; with --image use --out OUT.png")
    else:
        if opts.text:
            parser.error("--text goes with --image; with --jsonl the texts come from the file")
        if opts.out:
            parser.error("--out is for --image; with --jsonl use --out_dir DIR")
        if (opts.heatmap or opts.token_map) and not opts.out_dir:
            parser.error("--heatmap / --token_map with --jsonl need --out_dir DIR for the pictures")
    if opts.onnx and (opts.heatmap or opts.token_map):
        parser.error("--heatmap / --token_map need --checkpoint: an exported model (--onnx) gives boxes only")
    if opts.onnx and (opts.hf_clip_config or opts.bridge_attention != "per_sample"):
        parser.error("--bridge_attention / --hf_clip_config go with --checkpoint: an exported model (--onnx) has "
                     "the bridge it was exported with (export.py --bridge_attention)")
    if opts.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {opts.batch_size}")
    if opts.out is not None:
        ext = Path(opts.out).suffix.lower()
        if ext not in Image.registered_extensions():
            parser.error(f"--out {opts.out}: unknown picture format {ext or '(no extension)'}; use e.g. OUT.png")


def warn(msg: str) -> None:
    print(f"{PROG}: warning: {msg}", file=sys.stderr)


def gather_requests(opts) -> List[Request]:
    """The (image, text) requests of --image/--text or --jsonl, every image checked readable."""
    if opts.image is not None:
        texts = [check_text(t, f"--text #{i + 1}") for i, t in enumerate(opts.text)]
        open_image(opts.image, "--image").close()           # fail before loading the model
        return [Request(image=opts.image, path=Path(opts.image), text=t, where=f"--text #{i + 1}")
                for i, t in enumerate(texts)]
    requests = read_requests(opts.jsonl, opts.image_root)
    for path in dict.fromkeys(r.path for r in requests):
        what = next(r.where for r in requests if r.path == path) + ": image"
        open_image(path, what).close()
    return requests


def picture_paths(opts, requests: List[Request], out_flag: str) -> Dict[Path, Path]:
    """Image -> picture path (--image: --out; --jsonl: one per distinct image under --out_dir), folders
    created, never an input image."""
    if opts.image is not None:
        pictures = {requests[0].path: Path(opts.out) if opts.out else Path(f"{Path(opts.image).stem}_hivg.png")}
    elif opts.out_dir:
        pictures, used = {}, set()
        for path in dict.fromkeys(r.path for r in requests):
            name, n = path.stem, 1
            while name in used:
                name, n = f"{path.stem}_{n}", n + 1
            used.add(name)
            pictures[path] = Path(opts.out_dir) / f"{name}_hivg.png"
    else:
        pictures = {}
    inputs = {r.path.resolve() for r in requests}
    for picture in pictures.values():
        if picture.resolve() in inputs:
            raise UserError(f"{out_flag} would overwrite the input image {picture}; choose another path")
    for p in set(pictures.values()):
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{out_flag}: cannot create the folder {p.parent} ({e})") from None
    return pictures


def expression_files(req: Request, pred: Grounding, picture: Optional[Path], *, index: int, colour,
                     out_flag: str) -> Dict[str, Path]:
    """The heat-map and mask pictures of one prediction (those computed), saved beside `picture` as
    <stem>_<kind>_<index><its suffix> (masks: .png); none without a picture."""
    files = {}
    if picture is None:
        return files
    if pred.attention is not None or pred.token_map is not None:
        image = load_rgb(req.path, req.where)
        for kind, pic in heat_pictures(image, pred, req.text, colour=colour).items():
            files[kind] = heat_path(picture, kind, index)
            save_picture(pic, files[kind], out_flag)
    if pred.mask is not None:
        files["mask"] = heat_path(picture, "mask", index).with_suffix(".png")   # lossless, whatever --out is
        save_picture(Image.fromarray(pred.mask), files["mask"], out_flag)     # bool: a 1-bit PNG
    return files


def load_grounder(path, device, **options):
    """utils.cli.load_grounder, imported when called: the --onnx path imports no model code."""
    from utils.cli import load_grounder as load
    return load(path, device, **options)


def open_grounder(opts):
    """models.api.Grounder on --checkpoint, or utils.onnx_grounder.OnnxGrounder on --onnx (no model code)."""
    if opts.onnx:
        from utils.onnx_grounder import OnnxGrounder
        return OnnxGrounder.from_file(opts.onnx)
    return load_grounder(opts.checkpoint, resolve_device(opts.device), hf_clip_config=opts.hf_clip_config,
                         bridge_attention=opts.bridge_attention)


def run(opts) -> int:
    from tqdm import tqdm

    from datasets.tokens import is_truncated
    from utils.visualize import PALETTE

    requests = gather_requests(opts)
    out_flag = "--out" if opts.image is not None else "--out_dir"
    pictures = picture_paths(opts, requests, out_flag)
    grounder = open_grounder(opts)
    if opts.mask and not grounder.segments:
        model = f"the checkpoint {opts.checkpoint}" if opts.checkpoint else f"the exported model {opts.onnx}"
        raise UserError(f"--mask: {model} was trained without the segmentation head, so it gives no masks; drop "
                        "--mask or use a checkpoint trained with --use_mask_loss")
    if opts.mask:
        coco_mask_module()                                  # fail before predicting
    if opts.token_map and not grounder.scored:
        warn("this checkpoint was trained without --use_rtcc_constrain_loss: its token-alignment head is "
             "untrained and the map means nothing")
    for r in requests:
        if is_truncated(r.text.lower(), grounder.context_length):
            warn(f"{r.where}: the expression is longer than the model's {grounder.context_length} tokens and "
                 "is truncated")

    per_image: Dict[Path, list] = {}
    bar = tqdm(total=len(requests), desc="predict", unit="expr", file=sys.stderr,
               disable=True if opts.image is not None else None)
    for start in range(0, len(requests), opts.batch_size):
        chunk = requests[start:start + opts.batch_size]
        cache: Dict[Path, Prepared] = {}
        for r in chunk:
            if r.path not in cache:
                cache[r.path] = prepare_file(grounder, r.path,
                                             "--image" if opts.image is not None else f"{r.where}: image")
        preds = grounder.ground_prepared([cache[r.path] for r in chunk], [r.text for r in chunk],
                                         heatmap=opts.heatmap, token_map=opts.token_map, mask=opts.mask)
        for r, pred in zip(chunk, preds):
            entries = per_image.setdefault(r.path, [])
            colour = PALETTE[len(entries) % len(PALETTE)]
            files = expression_files(r, pred, pictures.get(r.path), index=len(entries), colour=colour,
                                     out_flag=out_flag)
            entries.append((r.text, pred.box_xyxy, colour, pred.mask))
            print(json_line(r, pred, files), flush=True)
        bar.update(len(chunk))
    bar.close()
    for path, picture in pictures.items():
        entries = per_image[path]
        image = load_rgb(path, "--image" if opts.image is not None else "image")
        if opts.mask:
            image = overlay_masks(image, [e[3] for e in entries], colours=[e[2] for e in entries])
        save_picture(draw_boxes(image, [e[1] for e in entries], [e[0] for e in entries],
                                colours=[e[2] for e in entries]),
                     picture, out_flag)
        print(f"wrote {picture}", file=sys.stderr)
    return 0


@reports_errors(PROG)
def main(argv=None) -> int:
    parser = get_args_parser()
    opts = parser.parse_args(argv)
    validate(opts, parser)
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
