"""Multi-head attention for every HiVG attention: the CLIP towers, the bridges and the fusion encoder.

`Attention` keeps nn.MultiheadAttention's parameter layout (`in_proj_weight` [3d, d] with q/k/v stacked,
`in_proj_bias` [3d], `out_proj`), so open_clip and converted checkpoints load under the same names, and
may carry Hi LoRA adapters (models.lora) on its fused q/k/v projection and on its output projection.

`attend` is the kernel: SDPA, or an eager reference for benchmarks. With attention dropout on the CPU,
SDPA falls back to its math kernel and torch's slow CPU dropout; the explicit path with models.dropout
does the same work with a cheaper mask.
"""
from contextlib import contextmanager
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import dropout

_EAGER = False


@contextmanager
def eager_attention():
    """Run attention as explicit matmul + softmax (the plain path, for side-by-side benchmarks)."""
    global _EAGER
    previous, _EAGER = _EAGER, True
    try:
        yield
    finally:
        _EAGER = previous


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: Optional[torch.Tensor] = None,
           causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """q: [B, h, L, e], k/v: [B, h, T, e], keep: bool broadcastable to [B, h, L, T] (True = attend)."""
    if not _EAGER and not (dropout_p > 0 and q.device.type == "cpu"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p, is_causal=causal)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if causal:
        L, T = scores.shape[-2:]
        keep = torch.ones(L, T, dtype=torch.bool, device=q.device).tril()
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return dropout(scores.softmax(dim=-1), dropout_p) @ v


class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameters and optional LoRA adapters.

    in_proj_weight: [3d, d], in_proj_bias: [3d] (q, k, v stacked); out_proj: Linear(d, d).
    lora_in / lora_out: None, or models.lora.LoRA adapters (groups=3 on the fused q/k/v projection,
    groups=1 on out_proj) set by models.lora.add_attention_lora; with none there are no adapter keys.

    The q/k/v projections start at zero: each owner initialises them as its reference does (the bridge
    as three nn.Linear, the fusion encoder with DETR's xavier; CLIP's are shared, see `sharing`).
    `dropout` is the attention-probability dropout, applied in training mode as nn.MultiheadAttention.
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0, device: Optional[torch.device] = None):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.num_heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * width, width, device=device))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width, device=device))
        self.out_proj = nn.Linear(width, width, device=device)
        self.register_module("lora_in", None)
        self.register_module("lora_out", None)

    @classmethod
    def sharing(cls, mha: nn.MultiheadAttention) -> "Attention":
        """An Attention holding the very parameters of `mha` (open_clip's), under the same names."""
        if mha.in_proj_weight is None or mha.in_proj_bias is None or mha.bias_k is not None:
            raise ValueError("HiVG needs attention with fused, biased q/k/v projections (open_clip's CLIP)")
        # Built on the meta device: nothing allocated, no random draw, so seeded inits stay as before.
        attn = cls(mha.embed_dim, mha.num_heads, mha.dropout, device=torch.device("meta"))
        attn.in_proj_weight, attn.in_proj_bias, attn.out_proj = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj
        return attn

    @property
    def has_lora(self) -> bool:
        """Whether adapters are attached (models.lora.add_attention_lora; merge_lora removes them)."""
        return self.lora_in is not None or self.lora_out is not None

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                keep: Optional[torch.Tensor] = None, causal: bool = False) -> torch.Tensor:
        """query: [B, L, d]; key, value: [B, T, d] -> [B, L, d].

        key defaults to the query and value to the key. Inputs passed as the same tensor share one
        projection GEMM: all three for self-attention, q and k for the fusion layer (positions on q
        and k only), k and v for the bridge. keep: bool broadcastable to [B, h, L, T] (True = attend).
        """
        key = query if key is None else key
        value = key if value is None else value
        q, k, v = (self._heads(t) for t in self._project((query, key, value)))
        y = attend(q, k, v, keep=keep, causal=causal, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).flatten(2)
        out = self.out_proj(y)
        return out if self.lora_out is None else out + self.lora_out(y)

    def query_attention(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None, index: int = 0) -> torch.Tensor:
        """Self-attention probabilities of token `index` of x [B, L, d] over all of x, mean over heads: [B, L].

        keep: bool broadcastable to [B, h, 1, L] (True = attend). For the [REG] heat map of the fusion
        encoder; no dropout.
        """
        q, k = (self._heads(t) for t in self._in_projection(x, 0, 2).chunk(2, dim=-1))
        scores = (q[:, :, index:index + 1] * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        return scores.softmax(dim=-1).mean(dim=1)[:, 0]

    def _project(self, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """q, k, v [B, *, d] of their inputs; consecutive slots given the same tensor share one GEMM."""
        out, start = [], 0
        for stop in (1, 2, 3):
            if stop == 3 or inputs[stop] is not inputs[start]:
                out += self._in_projection(inputs[start], start, stop).chunk(stop - start, dim=-1)
                start = stop
        return out

    def _in_projection(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Slots start..stop-1 of q/k/v (0, 1, 2) of x [B, L, d], LoRA included: [B, L, (stop - start) d]."""
        d = self.in_proj_weight.shape[1]
        rows = slice(start * d, stop * d)
        y = F.linear(x, self.in_proj_weight[rows], self.in_proj_bias[rows])
        return y if self.lora_in is None else y + self.lora_in(x, slice(start, stop))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, L, d] -> [B, h, L, d / h] (a view)."""
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
