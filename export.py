"""Export a HiVG checkpoint (ours, or the authors' converted on load) to ONNX, for onnxruntime.

    python export.py --checkpoint CKPT --out MODEL.onnx [--bridge_attention official]
    python predict.py --onnx MODEL.onnx --image IMG --text "the man on the left"

The graph is the model's eval path with LoRA merged (models/export.py): inputs images [B, 3, S, S] float32
(the eval transform's letterboxed image), pixel_mask [B, S, S] int32 (1 = padding) and ids [B, T] int64 (CLIP
token ids, zero-padded); outputs pred_box [B, 4] (cx, cy, w, h in [0, 1] of the padded frame) and, for a model
trained with the segmentation head, seg_map [B, 1, 8 gh, 8 gw] mask logits. The batch size is free. The
file's metadata holds the input size, text length and config that utils/onnx_grounder.py reads.

After writing, it runs two expressions of different lengths through onnxruntime and eager PyTorch and prints
the largest box difference. The exporter is torch.export's (`dynamo=True`): the TorchScript one cannot export
the antialiased resizes of the patch padding mask and of the position embedding.
"""
import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image

from models.export import INPUT_NAMES, ExportHiVG
from utils.cli import load_grounder
from utils.errors import UserError, reports_errors
from utils.flags import add_hf_clip_config_arg
from utils.onnx_grounder import FORMAT, FORMAT_KEY, HOW, OnnxGrounder

PROG = "export.py"
OPSET = 18    # the first with Resize's antialias


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(PROG, description="Export a HiVG checkpoint to ONNX.", allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint of train_hivg.py / utils.checkpoint, or an official HiVG checkpoint")
    parser.add_argument("--out", required=True, help="the ONNX file to write (MODEL.onnx)")
    parser.add_argument("--bridge_attention", default="per_sample", choices=("per_sample", "official"),
                        help="per_sample: each sample alone (default); official: the authors' batch-mixing "
                             "reshape, exported as it is: predictions then depend on the batch")
    add_hf_clip_config_arg(parser)
    return parser


def check_writable(out: Path) -> None:
    """Refuse, before the model loads, an --out that cannot be written."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; pass a file path such as {out / 'model.onnx'}")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist; create it or choose another path")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(f"--out {out} cannot be written (permission denied); choose a writable path")


def metadata(module: ExportHiVG, checkpoint: str) -> dict:
    """What utils/onnx_grounder.py reads back: the format, input size, text length, outputs and config."""
    model = module.model
    return {FORMAT_KEY: FORMAT, "hivg.image_size": str(model.image_size),
            "hivg.context_length": str(model.context_length), "hivg.outputs": ",".join(module.output_names),
            "hivg.bridge_attention": model.config.bridge_attention, "hivg.checkpoint": Path(checkpoint).name,
            "hivg.config": json.dumps(model.config.to_dict())}


def export_onnx(module: ExportHiVG, out: Path, *, checkpoint: str, optimize: bool = True) -> None:
    """Write `module` (models/export.py) to `out` with a dynamic batch size and its metadata; weights over
    2 GB go to an external data file beside it (ONNX's protobuf limit). `optimize`: onnxscript's graph
    optimizer (constant folding, fusions; onnxruntime optimizes again when it loads the file)."""
    try:                # the exporter's own dependency, which torch imports only once it runs
        importlib.import_module("onnxscript")
    except ImportError as e:
        raise UserError(f"export needs onnx and onnxscript ({e}): {HOW}") from None
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.onnx.export(module, module.example_inputs(), dynamo=True, opset_version=OPSET,
                                    input_names=list(INPUT_NAMES), output_names=list(module.output_names),
                                    dynamic_shapes=({0: batch}, {0: batch}, {0: batch}), optimize=optimize,
                                    verbose=False)
    program.model.metadata_props.update(metadata(module, checkpoint))
    try:
        program.save(str(out))
    except OSError as e:
        raise UserError(f"--out {out} cannot be written ({e}); choose a writable path") from None


def largest_box_difference(grounder: OnnxGrounder, module: ExportHiVG) -> float:
    """Max |box| difference between onnxruntime and eager PyTorch on two expressions of different lengths in
    one batch, over a letterboxed (partly padded) image."""
    image = Image.new("RGB", (module.model.image_size, module.model.image_size // 2), (120, 90, 60))
    prepared = [grounder.prepare(image)] * 2
    texts = ["a", "the second object from the left under the large red circle"]
    onnx_boxes = torch.from_numpy(grounder.run(prepared, texts)["pred_box"])
    feeds = grounder.feeds(prepared, texts)
    with torch.no_grad():
        eager_boxes = module(*(torch.from_numpy(feeds[name]) for name in INPUT_NAMES))[0]
    return (onnx_boxes - eager_boxes).abs().max().item()


@reports_errors(PROG)
def main(argv=None) -> int:
    opts = get_args_parser().parse_args(argv)
    out = Path(opts.out)
    check_writable(out)
    grounder = load_grounder(opts.checkpoint, torch.device("cpu"), hf_clip_config=opts.hf_clip_config,
                             bridge_attention=opts.bridge_attention)
    module = ExportHiVG(grounder.model)
    export_onnx(module, out, checkpoint=opts.checkpoint)
    exported = OnnxGrounder.from_file(out, what="--out")
    print(f"wrote {out} (outputs {', '.join(module.output_names)}; batch size free); onnxruntime vs PyTorch on two "
          f"expressions: max |box difference| {largest_box_difference(exported, module):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
