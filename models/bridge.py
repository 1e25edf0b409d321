"""Multi-layer adaptive cross-modal bridge (docs/method.md, section 2).

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
from .attention import Attention

BRIDGE_ATTENTION_MODES = ("per_sample", "official")


@torch.no_grad()
def init_like_linears(attn: Attention) -> None:
    """q/k/v initialised as three separate nn.Linear(d, d), as the official bridge has them."""
    d = attn.in_proj_weight.shape[1]
    for w, b in zip(attn.in_proj_weight.view(3, d, d), attn.in_proj_bias.view(3, d)):
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        nn.init.uniform_(b, -1 / math.sqrt(d), 1 / math.sqrt(d))


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
        context_length: text length T (77), the rows of each adaptive-weight matrix.
        adaptive_weights: use W_i and the n*d_t -> d_v gate; otherwise KV is the last text input.
        bridge_attention: "per_sample" or "official" (see forward).
    The last three are HiVGConfig's fields of the same names.
    """

    def __init__(self, width: int, heads: int, mlp_width: int, *, text_width: int, num_text_layers: int,
                 context_length: int = 77, adaptive_weights: bool = True, bridge_attention: str = "per_sample"):
        super().__init__()
        if bridge_attention not in BRIDGE_ATTENTION_MODES:
            raise ValueError(f"--bridge_attention must be one of {BRIDGE_ATTENTION_MODES}, got {bridge_attention!r}")
        self.bridge_attention = bridge_attention
        self.norm = nn.LayerNorm(width, eps=1e-5)
        self.attn = Attention(width, heads)
        init_like_linears(self.attn)
        self.mlp = BridgeMLP(width, mlp_width)
        if adaptive_weights:
            # torch's default Embedding init, N(0, 1), as the official nn.Embedding weights.
            self.adaptive_weights = nn.ParameterList(
                nn.Parameter(torch.randn(context_length, text_width)) for _ in range(num_text_layers))
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
        """x: [B, L, d_v] vision tokens -> residual update [B, L, d_v].

        `bridge_attention='official'` reproduces the authors' batch-mixing reshape: their key/value tensor is laid
        out (T, B, d) but viewed as (B, T, d), so each sample attends to tokens of the whole batch.
        """
        kv = self.text_kv(text_states).to(x.dtype)
        if self.bridge_attention == "official":
            kv = kv.transpose(0, 1).reshape(kv.shape)
        return self.mlp(self.attn(self.norm(x), kv))
