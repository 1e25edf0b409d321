"""Output heads on the fused tokens (docs/method.md, section 4)."""
import torch
import torch.nn.functional as F
from torch import nn

from .activations import QuickGELU


class BoxHead(nn.Module):
    """3-layer MLP on the [REG] token: [B, D] -> sigmoid (cx, cy, w, h) in [0, 1], [B, 4]."""

    def __init__(self, width: int, num_layers: int = 3):
        super().__init__()
        dims = [width] * num_layers + [4]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x.sigmoid()


class TokenAlignHead(nn.Module):
    """One logit per patch: MLP(LN(patch)) . normalised text EOT. [B, N, D], [B, D] -> [B, N]."""

    def __init__(self, width: int, hidden: int = 3072):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-5)
        self.fc1 = nn.Linear(width, hidden)
        self.act = QuickGELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, patches: torch.Tensor, text_eot_unit: torch.Tensor) -> torch.Tensor:
        feats = self.fc2(self.act(self.fc1(self.norm(patches))))
        return (feats * text_eot_unit[:, None, :]).sum(-1)


class SegHead(nn.Module):
    """Patch grid upsampled 8x by 3 transposed convs, dot the text EOT: [B, N, D] -> [B, 1, 8gh, 8gw].

    The convs (kernel 2, stride 2, no bias) and the dot product are linear, so the EOT vector is pulled
    back through the conv weights first: a [B, D, 8, 8] kernel per sample instead of a [B, D, 8gh, 8gw]
    feature map. Same function, about 1/40 of the FLOPs and none of the large activations.
    """

    def __init__(self, width: int):
        super().__init__()
        self.convs = nn.Sequential(*(nn.ConvTranspose2d(width, width, kernel_size=2, stride=2, bias=False)
                                     for _ in range(3)))

    def forward(self, patches: torch.Tensor, grid, text_eot_unit: torch.Tensor) -> torch.Tensor:
        B, N, D = patches.shape
        w1, w2, w3 = (conv.weight for conv in self.convs)  # each [D_in, D_out, 2, 2]
        k = torch.einsum("pqxy,bq->bpxy", w3, text_eot_unit)        # [B, D, a3, c3]
        k = torch.einsum("pqxy,bqzw->bpxyzw", w2, k)                # [B, D, a2, c2, a3, c3]
        k = torch.einsum("pqxy,bqzwuv->bpxyzwuv", w1, k)            # [B, D, a1, c1, a2, c2, a3, c3]
        x = patches.transpose(1, 2).reshape(B, D, *grid)
        seg = torch.einsum("bdij,bdxyzwuv->bixzujywv", x, k)        # rows (i, a1, a2, a3), cols (j, c1, c2, c3)
        return seg.reshape(B, 1, grid[0] * 8, grid[1] * 8)
