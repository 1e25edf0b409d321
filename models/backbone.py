"""The frozen open_clip CLIP towers, run by our own forward.

open_clip's CLIP owns the weights (names `visual.*`, `transformer.*`, `token_embedding`, ...). We walk
its blocks ourselves so that we can (a) keep the per-layer text hidden states, (b) insert the
cross-modal bridges between a vision block's attention and its MLP, (c) interpolate position
embeddings to any grid, and (d) run attention through SDPA with Hi LoRA side paths: each block's
nn.MultiheadAttention is replaced by a models.attention.Attention holding the same parameters, so
open_clip's own block forward is not used (nor usable) on these towers.
"""
import math
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from .activations import quick_gelu
from .attention import Attention


def build_clip(clip_cfg: dict) -> nn.Module:
    """open_clip CLIP from a config dict (open_clip's kwargs: embed_dim, vision_cfg, text_cfg, quick_gelu).

    Every block's `attn` becomes an Attention sharing its parameters: state-dict names are unchanged.
    """
    model = open_clip.model.CLIP(**clip_cfg)
    for blk in list(model.visual.transformer.resblocks) + list(model.transformer.resblocks):
        if type(blk) is not ResidualAttentionBlock:
            raise ValueError(f"unsupported open_clip block type {type(blk).__name__}: HiVG needs the plain "
                             "CLIP ResidualAttentionBlock (no custom attention, no attentional pooler)")
        blk.attn = Attention.sharing(blk.attn)
    return model


def block_forward(blk: ResidualAttentionBlock, x: torch.Tensor, causal: bool = False,
                  bridge: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """One CLIP block; the bridge (if any) adds its update after attention, before the MLP."""
    x = x + blk.ls_1(blk.attn(blk.ln_1(x), causal=causal))
    if bridge is not None:
        x = x + bridge(x)
    return x + blk.ls_2(mlp_forward(blk.mlp, blk.ln_2(x)))


def mlp_forward(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """open_clip's c_fc -> act -> c_proj, with the memory-lean QuickGELU when the block uses QuickGELU."""
    if isinstance(mlp.gelu, open_clip.transformer.QuickGELU):
        return mlp.c_proj(quick_gelu(mlp.c_fc(x)))
    return mlp(x)


def _run_block(blk, x, *, causal: bool, bridge, use_checkpoint: bool):
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block_forward, blk, x, causal=causal, bridge=bridge, use_reentrant=False)
    return block_forward(blk, x, causal=causal, bridge=bridge)


class TextFeatures(NamedTuple):
    hidden: Dict[int, torch.Tensor]  # block index -> [B, T, d_t] block output (before ln_final)
    tokens: torch.Tensor             # [B, T, d_t] after ln_final
    eot: torch.Tensor                # [B, d_t] final-LN feature at the EOT token (argmax of ids)


def encode_text(clip: nn.Module, ids: torch.Tensor, keep_layers: Sequence[int],
                use_checkpoint: bool = False) -> TextFeatures:
    """ids: [B, T] token ids (T = the context length). Causal attention, no padding mask (as CLIP)."""
    x = clip.token_embedding(ids) + clip.positional_embedding[: ids.shape[1]]
    hidden = {}
    for i, blk in enumerate(clip.transformer.resblocks):
        x = _run_block(blk, x, causal=True, bridge=None, use_checkpoint=use_checkpoint)
        if i in keep_layers:
            hidden[i] = x
    x = clip.ln_final(x)
    eot = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
    return TextFeatures(hidden, x, eot)


def interpolate_pos_embed(pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """pos: [1 + g*g, d] (CLS first) -> [1 + gh*gw, d], bicubic with antialias as the official code."""
    n = pos.shape[0] - 1
    g = int(math.isqrt(n))
    if g * g != n:
        raise ValueError(f"position embedding of {n} patches is not a square grid")
    if (g, g) == tuple(grid):
        return pos
    patches = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([pos[:1], patches.permute(0, 2, 3, 1).flatten(0, 2)], dim=0)


class VisionFeatures(NamedTuple):
    layers: List[torch.Tensor]  # per extracted block: [B, 1 + N, d_v] block output (CLS first)
    pooled: torch.Tensor        # [B, d_v] ln_post(CLS of the last block)
    grid: Tuple[int, int]       # patch grid (gh, gw), N = gh * gw


def encode_image(clip: nn.Module, pixels: torch.Tensor, extract_layers: Sequence[int],
                 bridges: Optional[Mapping[int, Callable[[torch.Tensor], torch.Tensor]]] = None,
                 use_checkpoint: bool = False) -> VisionFeatures:
    """pixels: [B, 3, H, W]. The bridges map a block index to `x [B, L, d_v] -> update [B, L, d_v]`."""
    v = clip.visual
    bridges = bridges or {}
    x = v.conv1(pixels)
    grid = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)
    cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + interpolate_pos_embed(v.positional_embedding, grid).to(x.dtype)
    x = v.ln_pre(x)
    layers = []
    for i, blk in enumerate(v.transformer.resblocks):
        x = _run_block(blk, x, causal=False, bridge=bridges.get(i), use_checkpoint=use_checkpoint)
        if i in extract_layers:
            layers.append(x)
    return VisionFeatures(layers, v.ln_post(x[:, 0]), grid)
