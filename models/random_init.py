"""Starting points for a random CLIP's frozen vision stem (the demo's tiny model; real runs load
pretrained CLIP weights over them). Chosen by the model config: `pos_embed_init`,
`patch_embed_init`.

A frozen random stem hides what a grounding head must read: open_clip's random position table is too
faint for the box regressor to find positions, and a random patch projection (3 p p -> width) mixes
every pixel of a patch, so outlines are hard to tell apart. The fixed tables below keep both readable.
"""
import math

import torch
from torch import nn

# Opponent colour axes (luminance, red-green, yellow-blue), unit length, over RGB.
OPPONENT_COLOURS = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]], dtype=torch.float64)
OPPONENT_COLOURS = OPPONENT_COLOURS / OPPONENT_COLOURS.norm(dim=1, keepdim=True)
LUMA_SHARE = 3 / 8      # of the patch features; the two colour axes split the rest (docs/demo.md)


@torch.no_grad()
def init_sincos_position_embedding(visual: nn.Module, temperature: float = 10000.0, scale: float = 1.0) -> None:
    """A fixed 2-D sine-cosine table for a random CLIP's vision position embedding (CLS row zero), at
    `scale` times the patch embedding's output std. open_clip's random init (std ~0.09 at small widths)
    leaves position barely readable from the features, and the box is read from those features.

    Frequencies run from 1 to 1 / `temperature` rad per patch: MAE's 10000 suits large grids; on a small
    grid most of its frequencies barely change across the image, a lower temperature spreads them."""
    pos = visual.positional_embedding
    g, d = math.isqrt(pos.shape[0] - 1), pos.shape[1]
    if g * g != pos.shape[0] - 1 or d % 4:
        raise ValueError("sincos position init needs a square grid and a width divisible by 4")
    omega = 1.0 / temperature ** (torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float64), torch.arange(g, dtype=torch.float64), indexing="ij")
    table = torch.cat([f(c.flatten()[:, None] * omega[None]) for c in (ys, xs) for f in (torch.sin, torch.cos)], 1)
    std = visual.conv1.weight.std() * math.sqrt(visual.conv1.weight[0].numel())
    pos[0].zero_()
    pos[1:].copy_(table / table.std() * std * scale)


def dct_basis(p: int) -> torch.Tensor:
    """[p * p, p, p] orthonormal 2-D DCT-II basis, lowest frequencies first (by u + v, then max(u, v))."""
    n = torch.arange(p, dtype=torch.float64)
    c = torch.cos(math.pi * (n[None] + 0.5) * n[:, None] / p) * math.sqrt(2 / p)
    c[0] /= math.sqrt(2)
    order = sorted(((u, v) for u in range(p) for v in range(p)), key=lambda uv: (uv[0] + uv[1], max(uv)))
    return torch.stack([torch.outer(c[u], c[v]) for u, v in order])


def dct_axis_counts(d: int):
    """Patch features per opponent colour axis for a width d."""
    luma = round(d * LUMA_SHARE)
    return luma, (d - luma) // 2, d - luma - (d - luma) // 2


@torch.no_grad()
def init_dct_patch_embedding(visual: nn.Module) -> None:
    """The patch projection as a JPEG-like transform: each output is one low-frequency 2-D DCT basis
    function of one opponent colour axis, 3/8 of them on luminance and 5/16 on each colour axis (on a muted
    background a coloured shape's outline shows most in colour). Rows are orthogonal, so distinct patches
    stay distinct; the weight keeps the random init's norm, so the features keep their scale. Call before
    `init_sincos_position_embedding`, which reads that scale."""
    w = visual.conv1.weight                                           # [width, 3, p, p]
    d, p = w.shape[0], w.shape[-1]
    counts = dct_axis_counts(d)
    if max(counts) > p * p:
        widest = max(n for n in range(1, 3 * p * p + 1) if max(dct_axis_counts(n)) <= p * p)
        raise ValueError(f"dct patch init: width {d} needs {max(counts)} frequencies of one colour axis, a "
                         f"{p}x{p} patch has {p * p}; use a width of at most {widest} with a patch of {p}")
    basis = dct_basis(p)
    colours = OPPONENT_COLOURS.to(basis.device)   # under `with torch.device("meta")` the basis is built there
    rows = torch.cat([colours[a][None, :, None, None] * basis[:n, None] for a, n in enumerate(counts)])
    w.copy_((rows / rows.norm() * w.double().norm()).to(w.dtype))
