"""Output heads on the fused tokens (docs/method.md, section 4), and their registry.

A head is declared once, as a `HeadSpec` registered in `HEADS`: its outputs, module, loss terms and weights,
the targets it reads, its run flag and optional evaluation metric. The model's forward and freezing, the
criterion (utils.losses), the training and evaluation loops (utils.engine), the model flags and the Python
API iterate over `HEADS`, so a new head is one `register_head` call (README, "Extending").
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import QuickGELU
from .head_losses import box_losses, contrastive_losses, segmentation_losses, token_alignment_losses
from .mask_metrics import segmentation_metric, segmentation_summary


class BoxHead(nn.Module):
    """3-layer MLP on the [REG] token: [B, D] -> sigmoid (cx, cy, w, h) in [0, 1], [B, 4]."""

    def __init__(self, width: int, num_layers: int = 3):
        super().__init__()
        dims = [width] * num_layers + [4]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x.sigmoid()


class TokenAlignHead(nn.Module):
    """One logit per patch: MLP(LN(patch)) . normalised text EOT. [B, N, D], [B, D] -> [B, N]."""

    def __init__(self, width: int, hidden: int = 3072):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-5)
        self.fc1 = nn.Linear(width, hidden)
        self.act = QuickGELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, patches: torch.Tensor, text_eot_unit: torch.Tensor) -> torch.Tensor:
        feats = self.fc2(self.act(self.fc1(self.norm(patches))))
        return (feats * text_eot_unit[:, None, :]).sum(-1)


class SegHead(nn.Module):
    """Patch grid upsampled 8x by 3 transposed convs, dot the text EOT: [B, N, D] -> [B, 1, 8gh, 8gw].

    The convs (kernel 2, stride 2, no bias) and the dot product are linear, so the EOT vector is pulled
    back through the conv weights first: a [B, D, 8, 8] kernel per sample instead of a [B, D, 8gh, 8gw]
    feature map. Same function, about 1/40 of the FLOPs and none of the large activations.
    """

    def __init__(self, width: int):
        super().__init__()
        self.convs = nn.Sequential(*(nn.ConvTranspose2d(width, width, kernel_size=2, stride=2, bias=False)
                                     for _ in range(3)))

    def forward(self, patches: torch.Tensor, grid, text_eot_unit: torch.Tensor) -> torch.Tensor:
        B, N, D = patches.shape
        w1, w2, w3 = (conv.weight for conv in self.convs)  # each [D_in, D_out, 2, 2]
        k = torch.einsum("pqxy,bq->bpxy", w3, text_eot_unit)        # [B, D, a3, c3]
        k = torch.einsum("pqxy,bqzw->bpxyzw", w2, k)                # [B, D, a2, c2, a3, c3]
        k = torch.einsum("pqxy,bqzwuv->bpxyzwuv", w1, k)            # [B, D, a1, c1, a2, c2, a3, c3]
        x = patches.transpose(1, 2).reshape(B, D, *grid)
        seg = torch.einsum("bdij,bdxyzwuv->bixzujywv", x, k)        # rows (i, a1, a2, a3), cols (j, c1, c2, c3)
        return seg.reshape(B, 1, grid[0] * 8, grid[1] * 8)


@dataclass
class HeadDims:
    """What a head's module factory may read: fusion width D, token-alignment MLP width, patch grid (gh, gw)."""
    width: int
    token_mlp_width: int
    grid: Tuple[int, int]


@dataclass
class Features:
    """What the heads read, from one forward pass (B samples, N = gh * gw patches, D fusion width).

    states: [B, 2 + N + T', D] fusion encoder output: [REG], the CLS token, the patches, the text tokens.
    grid: (gh, gw). eot_pos: [B] index of each text's EOT token.
    image_pooled: [B, d_v] CLIP's pooled image feature, text_eot: [B, d_t] its text tower's EOT feature,
    both before CLIP's projections; clip: the CLIP towers (projections, logit scale).
    """
    states: Tensor
    grid: Tuple[int, int]
    eot_pos: Tensor
    image_pooled: Tensor
    text_eot: Tensor
    clip: nn.Module
    _text_eot_unit: Optional[Tensor] = field(default=None, init=False, repr=False)

    @property
    def reg(self) -> Tensor:
        """[B, D] the fused [REG] token."""
        return self.states[:, 0]

    @property
    def patches(self) -> Tensor:
        """[B, N, D] the fused patch tokens."""
        return self.states[:, 2:2 + self.grid[0] * self.grid[1]]

    @property
    def text_eot_unit(self) -> Tensor:
        """[B, D] the fused text token at each EOT, unit norm (computed once, shared by the heads; not a
        functools.cached_property, whose lock torch.compile cannot trace)."""
        if self._text_eot_unit is None:
            text = self.states[:, 2 + self.grid[0] * self.grid[1]:]
            eot = text[torch.arange(text.shape[0], device=self.eot_pos.device), self.eot_pos]
            self._text_eot_unit = eot / eot.norm(dim=-1, keepdim=True)
        return self._text_eot_unit


@dataclass(frozen=True)
class LossTerm:
    """One weighted term of a head's loss: its loss-dict key, weight, and the authors' key ('' if none)."""
    key: str
    weight: float
    official_key: str = ""


@dataclass(frozen=True)
class HeadSpec:
    """Everything about one head, in one place (README "Extending").

    name: the head's name in HiVGConfig.outputs and in `outputs=` of HiVG.forward.
    outputs: keys `compute` adds to the model's output dict.
    compute(module, features) -> {output key: tensor}: its module (None without one) on the shared Features.
    loss(outputs, targets) -> {term key: unweighted scalar}: outputs cast to float32, targets its `targets`.
    loss_terms: its terms with their weights, in the order `loss` returns them.
    targets: fields of datasets.collate.Batch its loss and metric read.
    flag: the run flag (argparse destination) that switches it on; '' for always on. flag_help: its --help.
    module / build: the model attribute holding its module (the state_dict prefix) and the factory
        build(HeadDims) -> nn.Module; '' / None for a head without parameters.
    metric(outputs, targets) -> {name: [B] per-sample values}, averaged over an evaluation split (optional):
        outputs are every output of the evaluation's forward (its own and the box head's), targets its `targets`
        and `metric_targets`. metric_targets: Batch fields only its metric reads (e.g. 'original_masks').
    summary(means) -> the reported metrics, from the means of every head's metric values (optional; default
        the means): for a metric that is not a mean, such as a ratio of sums.
    score(outputs, boxes [B, 4] cxcywh, grid, image_size) -> [B] confidence of the predicted boxes in [0, 1] (optional;
        models.api.Grounder reports the first enabled head's).
    """
    name: str
    outputs: Tuple[str, ...]
    compute: Callable[[Optional[nn.Module], Features], Dict[str, Tensor]]
    loss: Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Dict[str, Tensor]]
    loss_terms: Tuple[LossTerm, ...]
    targets: Tuple[str, ...] = ("boxes",)
    flag: str = ""
    flag_help: str = ""
    module: str = ""
    build: Optional[Callable[[HeadDims], nn.Module]] = None
    metric: Optional[Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Dict[str, Tensor]]] = None
    metric_targets: Tuple[str, ...] = ()
    summary: Optional[Callable[[Dict[str, float]], Dict[str, float]]] = None
    score: Optional[Callable[[Mapping[str, Tensor], Tensor, Tuple[int, int], int], Tensor]] = None


# The registered heads by name, in the order they compute, build their modules and add their loss terms.
HEADS: Dict[str, HeadSpec] = {}
# An output of the fusion encoder (its last layer's [REG] attention), not a head: for heat maps.
REG_ATTENTION = "reg_attention"


def register_head(spec: HeadSpec) -> HeadSpec:
    """Add `spec` after the heads registered so far; refused when a name, key, flag or module clashes."""
    taken = {"name": set(HEADS) | {REG_ATTENTION},
             "output": {k for s in HEADS.values() for k in s.outputs} | {REG_ATTENTION},
             "loss term": {t.key for s in HEADS.values() for t in s.loss_terms},
             "flag": {s.flag for s in HEADS.values() if s.flag},
             "module": {s.module for s in HEADS.values() if s.module}}
    mine = {"name": [spec.name], "output": list(spec.outputs), "loss term": [t.key for t in spec.loss_terms],
            "flag": [spec.flag] if spec.flag else [], "module": [spec.module] if spec.module else []}
    for what, values in mine.items():
        clash = sorted(set(values) & taken[what])
        if clash:
            raise ValueError(f"head {spec.name!r}: {what} {clash} is taken by a registered head; choose another")
    if bool(spec.module) != (spec.build is not None):
        raise ValueError(f"head {spec.name!r}: give both `module` and `build`, or neither")
    HEADS[spec.name] = spec
    return spec


def unregister_head(name: str) -> None:
    """Remove a registered head (tests, interactive use)."""
    del HEADS[name]


def output_names() -> Tuple[str, ...]:
    """What HiVG.forward can be asked for: the registered heads, then REG_ATTENTION."""
    return (*HEADS, REG_ATTENTION)


def enabled_heads(flags: Mapping[str, object]) -> List[str]:
    """The heads a run's flags (argparse destinations -> values) switch on, in registry order; a flag
    missing from `flags` counts as off, heads without a flag are always on."""
    return [name for name, spec in HEADS.items() if not spec.flag or flags.get(spec.flag)]


def official_loss_names() -> Dict[str, str]:
    """The authors' loss-dict key -> ours, for every term that has one."""
    return {t.official_key: t.key for s in HEADS.values() for t in s.loss_terms if t.official_key}


def box_score(token_map: Tensor, box_cxcywh: Tensor, grid, image_size: int) -> Tensor:
    """token_map [B, N] logits, boxes [B, 4] normalised -> [B]: mean sigmoid over the patches that the token-alignment
    target would mark for this box (the patch under the box centre when none would).

    The target (token_alignment_losses) is the S x S mask resized to the grid by nearest neighbour, which reads each
    patch's top-left pixel; that pixel's centre decides, with the box fill's rule (datasets.masks.box_to_mask)."""
    gh, gw = grid
    ys = (torch.arange(gh, device=token_map.device) * (image_size // gh) + 0.5) / image_size
    xs = (torch.arange(gw, device=token_map.device) * (image_size // gw) + 0.5) / image_size
    cx, cy, w, h = box_cxcywh.unbind(-1)
    inside_y = ((cy - h / 2)[:, None] <= ys[None]) & (ys[None] < (cy + h / 2)[:, None])
    inside_x = ((cx - w / 2)[:, None] <= xs[None]) & (xs[None] < (cx + w / 2)[:, None])
    inside = (inside_y[:, :, None] & inside_x[:, None, :]).flatten(1)
    centre = ((cy * gh).long().clamp(0, gh - 1) * gw + (cx * gw).long().clamp(0, gw - 1))
    inside[torch.arange(len(centre)), centre] |= ~inside.any(dim=1)
    prob = token_map.sigmoid() * inside
    return prob.sum(dim=1) / inside.sum(dim=1)


def clip_logits(_module: None, feats: Features) -> Dict[str, Tensor]:
    """CLIP's text-to-image similarity of the batch, [B, B] (rows: texts), with CLIP's logit scale."""
    clip = feats.clip
    img = feats.image_pooled @ clip.visual.proj
    txt = feats.text_eot @ clip.text_projection
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return {"logits_per_text": clip.logit_scale.exp() * txt @ img.t()}


# The built-in heads, in the authors' order of loss terms (docs/method.md, section 4).
register_head(HeadSpec(
    name="box", outputs=("pred_box",), module="box_head", build=lambda dims: BoxHead(dims.width),
    compute=lambda head, feats: {"pred_box": head(feats.reg)}, loss=box_losses,
    loss_terms=(LossTerm("loss_bbox", 2.0, "loss_bbox"), LossTerm("loss_giou", 2.0, "loss_giou"))))
register_head(HeadSpec(
    name="contrastive", outputs=("logits_per_text",), compute=clip_logits, loss=contrastive_losses,
    loss_terms=(LossTerm("loss_contrastive", 1.0, "loss_contrastive"),), targets=(),
    flag="use_contrastive_loss", flag_help="CLIP image-text contrastive loss"))
register_head(HeadSpec(
    name="token_map", outputs=("token_map",), module="token_align",
    build=lambda dims: TokenAlignHead(dims.width, dims.token_mlp_width),
    compute=lambda head, feats: {"token_map": head(feats.patches, feats.text_eot_unit)},
    loss=token_alignment_losses, targets=("obj_masks",),
    loss_terms=(LossTerm("loss_align_focal", 20.0, "loss_algin_focal"),  # the authors' spelling
                LossTerm("loss_align_dice", 2.0, "loss_align_dice")),
    flag="use_rtcc_constrain_loss", flag_help="token-alignment loss",
    score=lambda out, boxes, grid, image_size: box_score(out["token_map"].float(), boxes, grid, image_size)))
register_head(HeadSpec(
    name="seg_map", outputs=("seg_map",), module="seg_head", build=lambda dims: SegHead(dims.width),
    compute=lambda head, feats: {"seg_map": head(feats.patches, feats.grid, feats.text_eot_unit)},
    loss=segmentation_losses, targets=("obj_masks",),
    loss_terms=(LossTerm("loss_seg_focal", 20.0, "loss_seg_focal"), LossTerm("loss_seg_dice", 2.0, "loss_seg_dice")),
    flag="use_mask_loss", flag_help="segmentation loss",
    metric=segmentation_metric, metric_targets=("original_masks",), summary=segmentation_summary))
