"""The grounding page: a browser page over one HiVG checkpoint (README, section "Grounding page").

    pip install -r requirements-app.txt
    python app.py --checkpoint CKPT [--device cuda] [--port 7860] [--host 127.0.0.1] [--examples DIR]

Pick or upload an image, type one or more referring expressions (one per line) and get each predicted box
drawn in its own colour with its expression, the boxes as JSON, and on request each expression's mask (models
trained with --use_mask_loss) as a translucent overlay in its box's colour and the [REG] token's attention
over the patches (last fusion layer) for each expression. Predictions go through the Python API
(models/api.py), the same path as predict.py, so the boxes are predict.py's for the same image and text.

The model is loaded once, before the page is served; requests are served one at a time. Examples are images
and expressions of the embedded synthetic set (datasets/synthetic.py): those of --examples DIR (default: the
demo's data folder, outputs/demo/data, when it exists), else a handful generated into a temporary folder.
"""
import argparse
import json
import os
import signal
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from datasets.refer import IMAGE_DIRS, split_path
from datasets.splitfile import UNSAFE_FLAG, load_pickled_list
from datasets.tokens import CONTEXT_LENGTH, clip_token_count
from models.api import Grounder, Prepared
from utils.cli import load_grounder
from utils.distributed import resolve_device
from utils.errors import UserError, reports_errors
from utils.flags import add_device_arg
from utils.visualize import PALETTE, draw_boxes, heat_pictures, overlay_masks

PROG = "app.py"
DEMO_DATA = Path(__file__).resolve().parent / "outputs" / "demo" / "data"   # demo.sh's default
MAX_EXPRESSIONS = 8
MAX_SIDE = 4096            # a larger image is shown downscaled to this long side
MAX_PIXELS = Image.MAX_IMAGE_PIXELS   # PIL's decompression-bomb limit: a larger image is refused undecoded
MIN_DRAW_SIDE = 640        # smaller pictures are enlarged so boxes and captions stay readable
NUM_EXAMPLES = 8
# System fonts: the default theme would fetch web fonts, and the page must work offline.
FONTS = (["ui-sans-serif", "system-ui", "sans-serif"], ["ui-monospace", "monospace"])
# Small images (the examples are 64 pixels) shown larger, without blurring.
CSS = ("#examples .container { width: 128px !important; height: 128px !important; } "
       "#examples img { width: 100% !important; height: 100% !important; object-fit: contain !important; "
       "image-rendering: pixelated; } #image img { width: 100%; height: 100%; object-fit: contain; }")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(PROG, description="A browser page that grounds referring expressions "
                                                       "in images with a HiVG checkpoint.", allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint of train_hivg.py / utils.checkpoint, or an official HiVG checkpoint")
    add_device_arg(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default: this machine only; 0.0.0.0 exposes the page)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--examples", type=Path,
                        help="a folder made by python -m datasets.synthetic --out DIR (default: outputs/demo/data "
                             "when it exists, else a few images generated at start)")
    return parser


# ----------------------------------------------------------------------------------------- examples

def example_rows(folder: Optional[Path], scratch: str) -> List[List[str]]:
    """[image path, expression] of the first NUM_EXAMPLES samples of a synthetic set's test split; when no
    folder is given and the demo's is absent, of a small set generated into the folder `scratch`."""
    if folder is None and (DEMO_DATA / "synthref").is_dir():
        folder = DEMO_DATA
    if folder is None:
        from datasets.synthetic import generate
        folder = Path(scratch)
        generate(scratch, num_train=1, num_val=1, num_test=NUM_EXAMPLES, imsize=64)
    split = Path(split_path(str(folder), "synthref", "test"))
    if not split.is_file():
        raise UserError(f"the examples folder {folder} has no {split.relative_to(folder)}; make one with "
                        f"python -m datasets.synthetic --out {folder}")
    try:
        samples = load_pickled_list(str(split))
    except ValueError as e:
        # The page never unpickles without restrictions, so the loader's advice (a flag of the training and
        # evaluation tools) does not apply here: the fix is another folder.
        why = "holds objects besides plain types and was not loaded, since unpickling them can run code" \
            if UNSAFE_FLAG in str(e) else f"cannot be read ({e})"
        raise UserError(f"--examples {folder}: the examples file {split} {why}; regenerate the folder with "
                        f"python -m datasets.synthetic --out DIR and pass --examples DIR") from None
    images = folder / IMAGE_DIRS["synthref"]
    return [[str(images / s[0]), s[3]] for s in samples[:NUM_EXAMPLES] if (images / s[0]).is_file()]


# ----------------------------------------------------------------------------------------- inputs

def read_image(grounder: Grounder, path: Optional[str]) -> Tuple[Prepared, Image.Image, Tuple[float, float], str]:
    """The uploaded file as the model's input (decoded fully, as predict.py) and as the RGB picture to draw
    on, downscaled when its long side is over MAX_SIDE: (input, picture, x and y scales from the original to
    the picture, a note for the page). A UserError with the message to show when it is no usable image."""
    if not path:
        raise UserError("Upload an image or pick an example first.")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise UserError(f"The image is {w}x{h} pixels ({w * h / 1e6:.0f} M), over the page's limit of "
                                f"{MAX_PIXELS / 1e6:.0f} M: downscale it before uploading.")
            rgb = img.convert("RGB")
    except Image.DecompressionBombError:   # PIL refuses twice its limit when opening
        raise UserError(f"The image is over the page's limit of {MAX_PIXELS / 1e6:.0f} M pixels: downscale it "
                        "before uploading.") from None
    except UnidentifiedImageError:
        raise UserError("The file is not an image this page can read: upload a JPEG, PNG, WebP, BMP or GIF.") \
            from None
    except (OSError, ValueError) as e:
        raise UserError(f"The image cannot be decoded ({e}): it may be truncated or damaged.") from None
    prepared = grounder.prepare(rgb)
    if max(w, h) <= MAX_SIDE:
        return prepared, rgb, (1.0, 1.0), ""
    scale = MAX_SIDE / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    note = (f"The image is {w}x{h}, larger than {MAX_SIDE} pixels on its long side: it is shown downscaled to "
            f"{size[0]}x{size[1]}; the boxes below are in pixels of the original.")
    return prepared, rgb.resize(size, Image.BICUBIC), (size[0] / w, size[1] / h), note


def read_expressions(text: Optional[str], context_length: int) -> List[str]:
    """The non-blank lines of `text`, or a UserError naming the first problem (none, too many, too long)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        raise UserError('Type a referring expression, e.g. "the red circle on the left" (one per line).')
    if len(lines) > MAX_EXPRESSIONS:
        raise UserError(f"{len(lines)} expressions: the page grounds at most {MAX_EXPRESSIONS} at a time.")
    for n, line in enumerate(lines, 1):
        tokens = clip_token_count(line.lower())
        if tokens > context_length:
            clip = "" if context_length == CONTEXT_LENGTH else f" (CLIP's own is {CONTEXT_LENGTH})"
            raise UserError(f"Expression {n} is {tokens} CLIP tokens, over this model's {context_length}-token "
                            f"limit{clip}: shorten it.")
    return lines


# ----------------------------------------------------------------------------------------- grounding

def shown_mask(mask: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """A [H, W] bool mask of the original image on the picture shown, of `size` (w, h): nearest neighbour."""
    if mask.shape == (size[1], size[0]):
        return mask
    return np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST), dtype=bool)


def ground(grounder: Grounder, image_path: Optional[str], text: Optional[str], *, heatmap: bool,
           masks: bool = False):
    """(boxes picture, [(heat picture, caption)], boxes JSON, message) for the page; with `masks` the boxes
    picture carries each mask. Input problems come back as the message, so the server keeps serving."""
    try:
        if masks and not grounder.segments:
            raise UserError("This checkpoint was trained without the segmentation head (--use_mask_loss): it gives "
                            "no masks. Untick masks.")
        texts = read_expressions(text, grounder.model.context_length)
        prepared, image, scale, note = read_image(grounder, image_path)
    except UserError as e:
        return None, [], "", f"**{e}**"
    hits = grounder.ground_prepared([prepared] * len(texts), texts, heatmap=heatmap, mask=masks)
    drawn = [replace(hit, box_xyxy=[c * scale[i % 2] for i, c in enumerate(hit.box_xyxy)]) for hit in hits]
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(hits))]
    under_boxes = overlay_masks(image, [shown_mask(hit.mask, image.size) for hit in hits], colours=colours) \
        if masks else image
    picture = draw_boxes(under_boxes, [hit.box_xyxy for hit in drawn], texts, colours=colours,
                         min_side=MIN_DRAW_SIDE)
    heat = [(heat_pictures(image, hit, t, colour=c, min_side=MIN_DRAW_SIDE)["attn"], t)
            for hit, t, c in zip(drawn, texts, colours)] if heatmap else []
    boxes = []
    for t, hit in zip(texts, hits):
        entry = {"text": t, "box_xyxy": [round(c, 2) for c in hit.box_xyxy]}
        if hit.score is not None:
            entry["score"] = round(hit.score, 4)
        boxes.append(entry)
    listing = "[\n" + ",\n".join(json.dumps(b) for b in boxes) + "\n]"   # valid JSON, one box a line
    return picture, heat, listing, note


# ----------------------------------------------------------------------------------------- page

def build_page(grounder: Grounder, examples: List[List[str]], checkpoint: str):
    """The gradio Blocks of the page; its button is also the API endpoint /ground (gradio_client)."""
    import gradio as gr

    model = grounder.model
    with gr.Blocks(title="HiVG grounding", analytics_enabled=False) as page:
        gr.Markdown(f"## HiVG visual grounding\n`{checkpoint}` on {grounder.device}: input "
                    f"{model.image_size} px, expressions up to {model.context_length} tokens, at most "
                    f"{MAX_EXPRESSIONS} at a time.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 height=360, elem_id="image")
                text = gr.Textbox(label="Referring expressions, one per line", lines=3, elem_id="text",
                                  placeholder="the red circle on the left\nthe small star")
                heatmap = gr.Checkbox(label="[REG] attention heat maps", value=False, elem_id="heatmap")
                masks = gr.Checkbox(label="masks", value=False, elem_id="masks",
                                    info="each expression's mask over the picture (models trained with "
                                         "--use_mask_loss)")
                button = gr.Button("Ground", variant="primary", elem_id="ground")
            with gr.Column():
                message = gr.Markdown(label="Message", elem_id="message")
                picture = gr.Image(label="Boxes", type="pil", format="png", interactive=False, height=480,
                                   elem_id="picture")
                heat = gr.Gallery(label="[REG] attention (last fusion layer)", columns=3, height="auto",
                                  format="png", visible=False, elem_id="heat")
                boxes = gr.Code(label="Boxes (JSON, pixels of the original image)", language="json",
                                interactive=False, wrap_lines=True, show_line_numbers=False, elem_id="boxes")
        if examples:
            gr.Examples(examples, [image, text], label="Examples (synthetic set)", elem_id="examples",
                        examples_per_page=NUM_EXAMPLES)

        def on_click(image_file, expressions, heatmap_wanted, masks_wanted=False):   # scripts of 3 inputs still work
            return ground(grounder, image_file and image_file["path"], expressions, heatmap=heatmap_wanted,
                          masks=masks_wanted)

        # Unprocessed inputs: the image arrives as the uploaded file (in gradio's upload folder), so a file
        # that is not an image reaches read_image, which says so on the page, instead of failing in gradio.
        button.click(on_click, [image, text, heatmap, masks], [picture, heat, boxes, message], api_name="ground",
                     preprocess=False)
        heatmap.change(lambda on: gr.Gallery(visible=on), heatmap, heat, queue=False, api_visibility="private")
    return page


def serve(opts) -> None:
    """Load the model, then serve the page until interrupted; a UserError when it cannot start."""
    try:
        import gradio as gr
    except ImportError:
        raise UserError("the page needs gradio: pip install -r requirements-app.txt") from None
    grounder = load_grounder(opts.checkpoint, resolve_device(opts.device))
    theme = gr.themes.Default(font=FONTS[0], font_mono=FONTS[1])
    with tempfile.TemporaryDirectory(prefix="hivg_examples_") as scratch:   # removed when the server stops
        page = build_page(grounder, example_rows(opts.examples, scratch), opts.checkpoint)
        try:
            page.queue(default_concurrency_limit=1).launch(server_name=opts.host, server_port=opts.port,
                                                           theme=theme, css=CSS, max_file_size="50mb")
        except OSError as e:
            raise UserError(f"cannot serve on {opts.host}:{opts.port} ({e}); choose another --port") from None


@reports_errors(PROG)
def main(argv=None) -> int:
    opts = get_args_parser().parse_args(argv)
    if not 1 <= opts.port <= 65535:
        raise UserError(f"--port {opts.port} is not a port number: give one in 1-65535 (default 7860)")
    serve(opts)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # a local tool: nothing is sent elsewhere
    signal.signal(signal.SIGTERM, signal.default_int_handler)     # stopped like Ctrl-C: the server closes cleanly
    sys.exit(main())
