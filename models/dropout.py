"""Dropout with a cheap mask on the CPU; torch's fused kernel elsewhere.

torch's CPU dropout costs about as much as a dense layer of the same width, and a B/16 training step drops
roughly 80M elements (fusion encoder, LoRA inputs), so on the CPU the mask is cut from 64-bit random words
instead, two 32-bit draws per word (measurements: docs/benchmarks.md). The drop probability is rounded to a
multiple of 2^-32 and kept values are scaled by the inverse of the exact keep probability, so expectations are
preserved; the random stream differs from torch's. On CUDA `F.dropout` is used as is.
"""
import torch
import torch.nn.functional as F
from torch import nn


def keep_mask(shape, p: float, device=None):
    """(bool mask, True with probability 1 - p (p rounded to k / 2^32), and 1 / that probability)."""
    n = torch.Size(shape).numel()
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 1) // 2,), dtype=torch.int64, device=device)
    draws = words.view(torch.int32)[:n].view(shape)        # uniform over the int32 range
    dropped = round(p * 2 ** 32)
    return draws >= dropped - 2 ** 31, 2 ** 32 / (2 ** 32 - dropped)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Zero each element with probability p and scale the rest by 1 / (1 - p) (identity when not training)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    keep, scale = keep_mask(x.shape, p, x.device)
    return torch.where(keep, x * scale, 0.0)


class Dropout(nn.Dropout):
    """nn.Dropout (same parameters, state and repr) drawing its mask with `dropout` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
