"""A HiVG model exported by export.py, run through onnxruntime, behind models.api.Grounder's interface
(`prepare`, `ground`, `ground_prepared`): the same eval transform and box read-out (datasets.grounding), and
no model code, so a service needs only this file, datasets/ and onnxruntime (README, "Export (ONNX)").

The exported file says what it is in its metadata (ONNX metadata_props, keys below): written by export.py,
read here; a file without them is refused, naming --onnx.
"""
import json
from typing import Dict, List, Sequence

import numpy as np
import torch
from PIL import Image

from datasets.grounding import MASK_THRESHOLD, Grounding, Prepared, prepare
from datasets.tokens import tokenize
from utils.errors import UserError

# The metadata export.py stores; FORMAT changes when the graph's inputs or outputs do.
FORMAT_KEY, FORMAT = "hivg.onnx_format", "1"
INPUTS = ("images", "pixel_mask", "ids")
HOW = "pip install -r requirements-export.txt"


def onnxruntime_module():
    """The onnxruntime module, or a UserError with the pip line."""
    try:
        import onnxruntime
    except ImportError as e:
        raise UserError(f"running an exported model needs onnxruntime ({e}): {HOW}") from None
    return onnxruntime


def check_metadata(meta: Dict[str, str], *, inputs: Sequence[str], outputs: Sequence[str], where: str) -> None:
    """Refuse, naming `where`, a graph that is not a HiVG export of this format."""
    if meta.get(FORMAT_KEY) is None:
        raise UserError(f"{where} is not a HiVG model exported by export.py (no {FORMAT_KEY} in its metadata); "
                        "export one with: python export.py --checkpoint CKPT --out MODEL.onnx")
    if meta[FORMAT_KEY] != FORMAT:
        raise UserError(f"{where} is a HiVG export of format {meta[FORMAT_KEY]}, this code reads format {FORMAT}; "
                        "export it again with this code's export.py")
    if tuple(inputs) != INPUTS or "pred_box" not in outputs:
        raise UserError(f"{where}: its graph takes {list(inputs)} and gives {list(outputs)}, not the inputs "
                        f"{list(INPUTS)} and the output pred_box of a HiVG export; export it again with export.py")


class OnnxGrounder:
    """An exported HiVG model in an onnxruntime session, with its input transform and box read-out.

    image_size, context_length: the model's input side S and text length T (from the file's metadata).
    Boxes, and masks when the graph has the segmentation head's output: `ground_prepared` refuses heatmap /
    token_map, which the graph does not compute, and `score` is None.
    """

    scored = False

    def __init__(self, session, metadata: Dict[str, str]):
        self.session = session
        self.metadata = dict(metadata)
        self.image_size = int(metadata["hivg.image_size"])
        self.context_length = int(metadata["hivg.context_length"])
        self.output_names = [o.name for o in session.get_outputs()]
        self.segments = "seg_map" in self.output_names

    @classmethod
    def from_file(cls, path, *, what: str = "--onnx", threads: int = 0) -> "OnnxGrounder":
        """The model of an ONNX file written by export.py; a UserError naming `what` for anything else.
        `threads`: onnxruntime's intra-op threads (0: its default, one per core)."""
        ort = onnxruntime_module()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own classes, one per cause, for a file it cannot load
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{what} {path} cannot be loaded as an ONNX model ({reason}); pass a file written "
                            "by export.py") from None
        metadata = session.get_modelmeta().custom_metadata_map
        check_metadata(metadata, inputs=[i.name for i in session.get_inputs()],
                       outputs=[o.name for o in session.get_outputs()], where=f"{what} {path}")
        return cls(session, metadata)

    @property
    def config(self) -> dict:
        """The exported model's HiVGConfig fields (models/config.py), as export.py stored them."""
        return json.loads(self.metadata["hivg.config"])

    def prepare(self, image: Image.Image) -> Prepared:
        return prepare(image, self.image_size)

    def ground(self, images: Sequence[Image.Image], texts: Sequence[str], *, mask: bool = False) -> List[Grounding]:
        """The box (and with `mask` the mask) of texts[i] in images[i] (pass the same image several times for
        several expressions)."""
        return self.ground_prepared([self.prepare(im) for im in images], texts, mask=mask)

    def feeds(self, prepared: Sequence[Prepared], texts: Sequence[str]) -> Dict[str, np.ndarray]:
        """The graph's inputs (INPUTS) for (prepared[i], texts[i]) pairs."""
        return {"images": torch.stack([p.image for p in prepared]).numpy(),
                "pixel_mask": torch.stack([p.pixel_mask for p in prepared]).numpy(),
                "ids": tokenize(list(texts), self.context_length).numpy()}

    def run(self, prepared: Sequence[Prepared], texts: Sequence[str]) -> Dict[str, np.ndarray]:
        """The graph's outputs by name (pred_box [B, 4], seg_map [B, 1, h, w] when exported) for the pairs."""
        return dict(zip(self.output_names, self.session.run(self.output_names, self.feeds(prepared, texts))))

    def ground_prepared(self, prepared: Sequence[Prepared], texts: Sequence[str], *, heatmap: bool = False,
                        token_map: bool = False, mask: bool = False) -> List[Grounding]:
        """One run of the graph over (prepared[i], texts[i]) pairs."""
        if heatmap or token_map:
            raise UserError("an exported model gives boxes and masks only: drop --heatmap / --token_map with "
                            "--onnx, or pass --checkpoint")
        if mask and not self.segments:
            raise ValueError("mask=True: this exported model has no segmentation output; export a checkpoint "
                             "trained with --use_mask_loss")
        if len(prepared) != len(texts):
            raise ValueError(f"{len(prepared)} images for {len(texts)} texts: give one image per expression")
        out = self.run(prepared, texts)
        boxes = torch.from_numpy(out["pred_box"])
        hits = [Grounding(box_xyxy=p.letterbox.to_original(box).tolist(), score=None, box_padded=box,
                          letterbox=p.letterbox) for p, box in zip(prepared, boxes)]
        if mask:
            for p, hit, seg in zip(prepared, hits, out["seg_map"]):
                hit.mask = p.letterbox.mask_to_original(torch.from_numpy(seg[0]), threshold=MASK_THRESHOLD)
        return hits
