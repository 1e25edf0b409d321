"""The vision-language fusion encoder (SPEC section 4): DETR-style transformer encoder.

Positions are added to queries and keys (not values) in every layer; pre-norm layers end with a
final LayerNorm (`--normalize_before`), post-norm layers have none. Attention runs through SDPA.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attend
from .dropout import Dropout
from .lora import in_projection, out_projection


class SelfAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter layout (fused in_proj)."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, qk: torch.Tensor, v: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """qk: [B, L, D] (with positions), v: [B, L, D], pad_mask: [B, L] bool (True = ignore)."""
        B, L, D = v.shape
        h = self.num_heads
        q, k = in_projection(self, qk, slice(0, 2)).view(B, L, 2, h, D // h).permute(2, 0, 3, 1, 4)
        v = in_projection(self, v, slice(2, 3)).view(B, L, h, D // h).transpose(1, 2)
        keep = ~pad_mask[:, None, None, :]
        y = attend(q, k, v, keep, dropout_p=self.dropout if self.training else 0.0)
        return out_projection(self, y.transpose(1, 2).reshape(B, L, D))

    def query_attention(self, qk: torch.Tensor, pad_mask: torch.Tensor, query: int = 0) -> torch.Tensor:
        """Attention probabilities of one query over all tokens, averaged over heads: [B, L]."""
        B, L, D = qk.shape
        h = self.num_heads
        q, k = in_projection(self, qk, slice(0, 2)).view(B, L, 2, h, D // h).permute(2, 0, 3, 1, 4)
        scores = (q[:, :, query:query + 1] * (D // h) ** -0.5) @ k.transpose(-2, -1)
        scores = scores.masked_fill(pad_mask[:, None, None, :], float("-inf"))
        return scores.softmax(dim=-1).mean(dim=1)[:, 0]


class FusionLayer(nn.Module):
    def __init__(self, width: int, heads: int, ffn: int, dropout: float, normalize_before: bool):
        super().__init__()
        self.self_attn = SelfAttention(width, heads, dropout)
        self.linear1 = nn.Linear(width, ffn)
        self.linear2 = nn.Linear(ffn, width)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.dropout = Dropout(dropout)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.normalize_before = normalize_before

    def _ffn(self, x):
        return self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def reg_attention(self, x: torch.Tensor, pos: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """What the first token ([REG]) attends to in this layer: [B, L]."""
        y = self.norm1(x) if self.normalize_before else x
        return self.self_attn.query_attention(y + pos[: x.shape[1]], pad_mask)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D], pos: [>= L, D] (first L rows used), pad_mask: [B, L] bool."""
        pos = pos[: x.shape[1]]
        if self.normalize_before:
            y = self.norm1(x)
            x = x + self.dropout1(self.self_attn(y + pos, y, pad_mask))
            return x + self._ffn(self.norm2(x))
        x = self.norm1(x + self.dropout1(self.self_attn(x + pos, x, pad_mask)))
        return self.norm2(x + self._ffn(x))


class FusionEncoder(nn.Module):
    """x: [B, L, D] tokens, pos: [>= L, D] (the first L rows are used), pad_mask: [B, L] bool (True = padding)."""

    def __init__(self, width: int = 512, heads: int = 8, layers: int = 6, ffn: int = 2048,
                 dropout: float = 0.1, normalize_before: bool = True):
        super().__init__()
        layer = FusionLayer(width, heads, ffn, dropout, normalize_before)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(layers))
        self.norm = nn.LayerNorm(width) if normalize_before else None
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, pad_mask: torch.Tensor, reg_attention: bool = False):
        """-> (fused tokens [B, L, D], the last layer's [REG] attention [B, L] if `reg_attention` else None)."""
        attn = None
        for i, layer in enumerate(self.layers):
            if reg_attention and i == len(self.layers) - 1:
                attn = layer.reg_attention(x, pos, pad_mask)
            x = layer(x, pos, pad_mask)
        x = x if self.norm is None else self.norm(x)
        return x, attn
