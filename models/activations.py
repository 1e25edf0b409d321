"""QuickGELU, x * sigmoid(1.702 x), as CLIP (OpenAI weights) uses it, saving only its input for backward.

Autograd's default graph keeps both x and sigmoid(1.702 x) of every MLP; keeping x alone halves that
memory (one [tokens, 4 d] tensor per block). The derivative is silu'(1.702 x) (silu(z) = z sigmoid(z)),
which aten's fused `silu_backward` computes in one pass, faster than the elementwise formula
(measurements: docs/benchmarks.md).
"""
import torch
from torch import nn


class _QuickGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad, 1.702 * x)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _QuickGELU.apply(x)
    return x * torch.sigmoid(1.702 * x)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x)
