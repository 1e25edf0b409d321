"""The one attention kernel every HiVG attention calls: SDPA, or an eager reference for benchmarks.

With attention dropout on the CPU, SDPA falls back to its math kernel and torch's slow CPU dropout; the
explicit path with models.dropout does the same work with a cheaper mask.
"""
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F

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
