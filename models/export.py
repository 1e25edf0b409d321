"""HiVG's eval path as one graph for export (README, "Export (ONNX)"): no host read, any batch size.

`HiVG.forward` passes the text tokens up to the batch's last EOT to the fusion encoder, a length read on the
host that a traced graph would freeze at the export batch's value. This module runs the fusion encoder on all
T tokens instead (`for_export=True`): the tokens after each text's EOT are padding (id 0), masked as keys as
before and never read as outputs, so the boxes are the same up to fp32 rounding (tests/test_export.py). It
also takes the patch padding mask in integer arithmetic (models.hivg.exact_patch_padding_mask): onnxruntime's
antialiased resize rounds a patch that padding covers by half either way, which moves the box.

With the authors' batch-mixing bridge (`bridge_attention="official"`, models/bridge.py) the exported graph
mixes the samples of the batch it is given, as the eager model does: a prediction depends on the other
samples of its batch and on the batch size.
"""
from typing import Tuple

import torch
from torch import nn

from datasets.tokens import tokenize

from .hivg import HiVG
from .lora import attention_hosts

INPUT_NAMES = ("images", "pixel_mask", "ids")
# output key of HiVG.forward -> the head that computes it; the box always, the mask when that head trained
EXPORTED_OUTPUTS = {"pred_box": "box", "seg_map": "seg_map"}


class ExportHiVG(nn.Module):
    """A HiVG model (eval mode, LoRA merged) as (images, pixel_mask, ids) -> its outputs at full text length.

    images [B, 3, S, S] float32, pixel_mask [B, S, S] int32 (1 = padding), ids [B, T] int64 ->
    pred_box [B, 4] (cx, cy, w, h in [0, 1] of the padded frame) and, when the model's config enables the
    segmentation head, seg_map [B, 1, 8 gh, 8 gw] mask logits over the padded frame (`output_names`).
    """

    def __init__(self, model: HiVG):
        super().__init__()
        self.train(False)
        if model.training:
            raise ValueError("export needs a model in eval mode (models.weights.load_model gives one)")
        if next(attention_hosts(model), None) is not None:
            raise ValueError("export needs LoRA merged into its weights (models.lora.merge_lora)")
        self.model = model
        self.output_names = tuple(key for key, head in EXPORTED_OUTPUTS.items() if head in model.outputs)
        self.heads = tuple(EXPORTED_OUTPUTS[key] for key in self.output_names)

    def forward(self, images: torch.Tensor, pixel_mask: torch.Tensor, ids: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        out = self.model(images, pixel_mask, ids, outputs=self.heads, for_export=True)
        return tuple(out[key] for key in self.output_names)

    def example_inputs(self, batch: int = 2) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs of the right shapes and types for tracing: grey images, no padding, one-word texts. A batch
        of at least 2, so that the exporter keeps the batch dimension symbolic."""
        size = self.model.image_size
        return (torch.zeros(batch, 3, size, size), torch.zeros(batch, size, size, dtype=torch.int32),
                tokenize(["a"] * batch, self.model.context_length))
