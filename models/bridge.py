"""Multi-layer adaptive cross-modal bridge (SPEC section 2).

Inside a bridge layer of the vision tower, after the block's self-attention residual:

    T_i* = W_i * T_i + T_i                            (adaptive weights, one 77 x d_t matrix per text layer)
    KV   = Linear(n * d_t -> d_v)(concat_i T_i*)
    h    = h + MLP(CrossAttn(q = LN(h), k = v = KV))

Without adaptive weights (mixup pre-training) KV is the last text input as given (already d_v wide).
"""
import math
from typing import List

import torch
from torch import nn

from .activations import QuickGELU

from .attention import attend
from .lora import in_projection, out_projection

BRIDGE_ATTENTION_MODES = ("per_sample", "official")


class CrossAttention(nn.Module):
    """Multi-head attention of queries [B, L, d] over keys/values [B, T, d] (fused q/k/v weights).

    `mode='official'` reproduces the authors' batch-mixing reshape: their key/value tensor is laid
    out (T, B, d) but viewed as (B, T, d), so each sample attends to tokens of the whole batch.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"bridge width {width} is not divisible by {heads} heads")
        self.num_heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        # Same init as three separate nn.Linear(width, width), as the official bridge has.
        for w, b in zip(self.in_proj_weight.view(3, width, width), self.in_proj_bias.view(3, width)):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            nn.init.uniform_(b, -1 / math.sqrt(width), 1 / math.sqrt(width))

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mode: str = "per_sample") -> torch.Tensor:
        B, L, d = x.shape
        T = kv.shape[1]
        h = self.num_heads
        if mode == "official":
            kv = kv.transpose(0, 1).reshape(B, T, d)
        q = in_projection(self, x, slice(0, 1)).view(B, L, h, d // h).transpose(1, 2)
        k, v = in_projection(self, kv, slice(1, 3)).view(B, T, 2, h, d // h).permute(2, 0, 3, 1, 4)
        y = attend(q, k, v)
        return out_projection(self, y.transpose(1, 2).reshape(B, L, d))


class BridgeMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = QuickGELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CrossModalBridge(nn.Module):
    """One bridge layer.

    Args:
        width, heads, mlp_width: the vision block's width, head count and MLP hidden width.
        text_width: width of the text hidden states fed in (d_t).
        num_text_layers: how many text layers feed the bridge (n).
        text_len: text context length (77), the rows of each adaptive-weight matrix.
        adaptive_weights: use W_i and the n*d_t -> d_v gate; otherwise KV is the last text input.
    """

    def __init__(self, width: int, heads: int, mlp_width: int, text_width: int, num_text_layers: int,
                 text_len: int = 77, adaptive_weights: bool = True, mode: str = "per_sample"):
        super().__init__()
        if mode not in BRIDGE_ATTENTION_MODES:
            raise ValueError(f"--bridge_attention must be one of {BRIDGE_ATTENTION_MODES}, got {mode!r}")
        self.mode = mode
        self.norm = nn.LayerNorm(width, eps=1e-5)
        self.attn = CrossAttention(width, heads)
        self.mlp = BridgeMLP(width, mlp_width)
        if adaptive_weights:
            # torch's default Embedding init, N(0, 1), as the official nn.Embedding weights.
            self.adaptive_weights = nn.ParameterList(
                nn.Parameter(torch.randn(text_len, text_width)) for _ in range(num_text_layers))
            self.text_gate = nn.Linear(num_text_layers * text_width, width)
        else:
            self.adaptive_weights = None

    def text_kv(self, text_states: List[torch.Tensor]) -> torch.Tensor:
        """text_states: n x [B, T, d_t] -> keys/values [B, T, d_v]."""
        if self.adaptive_weights is None:
            return text_states[-1]
        weighted = [t * w[: t.shape[1]] + t for t, w in zip(text_states, self.adaptive_weights)]
        return self.text_gate(torch.cat(weighted, dim=-1))

    def forward(self, x: torch.Tensor, text_states: List[torch.Tensor]) -> torch.Tensor:
        """x: [B, L, d_v] vision tokens -> residual update [B, L, d_v]."""
        kv = self.text_kv(text_states).to(x.dtype)
        return self.mlp(self.attn(self.norm(x), kv, self.mode))
