"""The vision-language fusion encoder (docs/method.md, section 4): DETR-style transformer encoder.

Positions are added to queries and keys (not values) in every layer; pre-norm layers end with a
final LayerNorm (`--normalize_before`), post-norm layers have none. Attention runs through SDPA.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .dropout import Dropout


class FusionLayer(nn.Module):
    def __init__(self, width: int, heads: int, ffn: int, dropout: float, normalize_before: bool):
        super().__init__()
        self.self_attn = Attention(width, heads, dropout)
        nn.init.zeros_(self.self_attn.out_proj.bias)  # nn.MultiheadAttention's (DETR's) zero bias
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

    def reg_attention(self, x: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """What the first token ([REG]) attends to in this layer: [B, L]."""
        y = self.norm1(x) if self.normalize_before else x
        return self.self_attn.query_attention(y + pos[: x.shape[1]], keep)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x: [B, L, D], pos: [>= L, D] (first L rows used), keep: [B, 1, 1, L] bool (True = attend)."""
        pos = pos[: x.shape[1]]
        if self.normalize_before:
            y = self.norm1(x)
            x = x + self.dropout1(self.self_attn(y + pos, value=y, keep=keep))
            return x + self._ffn(self.norm2(x))
        x = self.norm1(x + self.dropout1(self.self_attn(x + pos, value=x, keep=keep)))
        return self.norm2(x + self._ffn(x))


class FusionEncoder(nn.Module):
    """x: [B, L, D] tokens, pos: [>= L, D] (the first L rows are used), pad_mask: [B, L] bool (True = padding).

    The size arguments are HiVGConfig's fields of the same names; `width` is the CLIP embedding width D.
    """

    def __init__(self, width: int = 512, fusion_heads: int = 8, fusion_layers: int = 6, fusion_ffn: int = 2048,
                 fusion_dropout: float = 0.1, normalize_before: bool = True):
        super().__init__()
        layer = FusionLayer(width, heads=fusion_heads, ffn=fusion_ffn, dropout=fusion_dropout,
                            normalize_before=normalize_before)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(fusion_layers))
        self.norm = nn.LayerNorm(width) if normalize_before else None
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, pad_mask: torch.Tensor, reg_attention: bool = False):
        """-> (fused tokens [B, L, D], the last layer's [REG] attention [B, L] if `reg_attention` else None)."""
        attn = None
        keep = ~pad_mask[:, None, None, :]
        for i, layer in enumerate(self.layers):
            if reg_attention and i == len(self.layers) - 1:
                attn = layer.reg_attention(x, pos, keep)
            x = layer(x, pos, keep)
        x = x if self.norm is None else self.norm(x)
        return x, attn
