"""Low-rank adapters (LoRA) for attention projections, the Hi LoRA stage policy, and merging.

An adapter adds `scale * B A dropout(x)` to a frozen projection `W x + b`. Attention layers here keep
their q/k/v weights fused in one `in_proj_weight` (open_clip's layout), so one `LoRA` module can carry
`groups` stacked adapters: group g adapts rows `g*out:(g+1)*out` of the fused weight. The update is
always applied as a low-rank side path; `B A` is only formed when merging.

Hosts are models.attention.Attention modules (the CLIP towers, the bridges, the fusion encoder): their
declared children `lora_in` (groups=3) and `lora_out` hold the adapters, None until added.
"""
import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .dropout import Dropout

# The authors' peft adapters (their checkpoints and debiased CLIP); ours take HiVGConfig's lora_* fields.
OFFICIAL_RANK = 32
OFFICIAL_ALPHA = 16

# Official code: vision layers whose LoRA trains at each stage (first N layers, for B and L alike).
OFFICIAL_VISION_LAYERS_PER_STAGE = {0: 0, 1: 5, 2: 8, 3: 12}
NUM_STAGES = 3


class LoRA(nn.Module):
    """`groups` low-rank adapters on one input.

    lora_A: [groups * r, in_features]   (kaiming-uniform, a = sqrt(5), as peft / microsoft LoRA)
    lora_B: [groups, out_features, r]   (zeros: a fresh adapter is the identity update)
    `shared_dropout`: the groups share one input dropout mask (one GEMM; paper mode, docs/benchmarks.md);
    otherwise each group draws its own, as peft's separate q/k/v adapters do in the authors' model.
    """

    def __init__(self, in_features: int, out_features: int, *, groups: int = 1, rank: int, alpha: float,
                 dropout: float, shared_dropout: bool = False):
        super().__init__()
        self.groups, self.rank, self.scale, self.shared_dropout = groups, rank, alpha / rank, shared_dropout
        self.lora_A = nn.Parameter(torch.empty(groups * rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(groups, out_features, rank))
        for a in self.lora_A.view(groups, rank, in_features):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, groups: Optional[slice] = None) -> torch.Tensor:
        """x: [..., in] -> update [..., n * out] for the selected groups (all by default)."""
        a = self.lora_A.view(self.groups, self.rank, -1)
        b = self.lora_B
        if groups is not None:
            a, b = a[groups], b[groups]
        n = a.shape[0]
        if n > 1 and self.training and getattr(self.dropout, "p", 0) > 0 and not self.shared_dropout:
            h = torch.stack([F.linear(self.dropout(x), a_g) for a_g in a], dim=-2)   # a mask per group
        else:   # no dropout: one GEMM for every group
            h = F.linear(self.dropout(x), a.reshape(n * self.rank, -1)).unflatten(-1, (n, self.rank))
        out = torch.einsum("...gr,gor->...go", h, b) * self.scale
        return out.flatten(-2)

    def delta_weight(self) -> torch.Tensor:
        """[groups * out, in]: the dense update this adapter adds to its weight."""
        a = self.lora_A.view(self.groups, self.rank, -1)
        return (torch.bmm(self.lora_B, a) * self.scale).flatten(0, 1)


def add_attention_lora(host: Attention, *, rank: int, alpha: float, dropout: float,
                       shared_dropout: bool = False) -> None:
    """Give an attention host a fresh q/k/v adapter (`lora_in`) and an output adapter (`lora_out`)."""
    d = host.in_proj_weight.shape[1]
    host.lora_in = LoRA(d, d, groups=3, rank=rank, alpha=alpha, dropout=dropout, shared_dropout=shared_dropout)
    host.lora_out = LoRA(d, d, rank=rank, alpha=alpha, dropout=dropout)


def attention_hosts(module: nn.Module) -> Iterator[Tuple[str, Attention]]:
    """The attention modules under `module` that carry adapters, with their names."""
    for name, m in module.named_modules():
        if isinstance(m, Attention) and m.has_lora:
            yield name, m


@torch.no_grad()
def merge_lora(module: nn.Module) -> int:
    """Fold every adapter under `module` into its weight (W += scale * B A) and remove it.

    Returns the number of hosts merged. The model computes the same function afterwards (up to fp
    rounding) with no LoRA cost; use it for inference or when an adapter is frozen for good.
    """
    hosts = list(attention_hosts(module))
    for _, host in hosts:
        if host.lora_in is not None:
            host.in_proj_weight.add_(host.lora_in.delta_weight().to(host.in_proj_weight.dtype))
            host.lora_in = None
        if host.lora_out is not None:
            host.out_proj.weight.add_(host.lora_out.delta_weight().to(host.out_proj.weight.dtype))
            host.lora_out = None
    return len(hosts)


def paper_stage_layers(num_layers: int, stage: int) -> range:
    """Vision layers that receive a new adapter at paper stage `stage` (groups 1..stage of 3)."""
    if num_layers % NUM_STAGES:
        raise ValueError(f"Hi LoRA splits the vision layers into {NUM_STAGES} groups; "
                         f"{num_layers} layers do not split evenly")
    return range(num_layers // NUM_STAGES * stage)


def _set_lora_trainable(host: Attention, trainable: bool) -> None:
    host.lora_in.requires_grad_(trainable)
    host.lora_out.requires_grad_(trainable)


def apply_hi_lora(vision_blocks: List[nn.Module], text_blocks: List[nn.Module], bridges: List[nn.Module], *,
                  stage: int, mode: str = "paper", rank: int, alpha: float, dropout: float) -> None:
    """Add the adapters of Hi LoRA `stage` (rank, alpha, dropout) and mark which adapters train (the caller
    froze CLIP).

    paper:    stage k gives every vision layer of groups 1..k a fresh trainable adapter; adapters of
              earlier stages are expected to be merged into the weights already (merge_lora_state_dict).
    official: every attention of both towers and of the bridges carries one adapter, kept across
              stages; text adapters train in stages >= 1, vision adapters of the first
              OFFICIAL_VISION_LAYERS_PER_STAGE[stage] layers train, bridge adapters always train.
    The q, k and v adapters share one dropout mask in paper mode (faster) and draw one each in official mode,
    as the authors' peft adapters do.
    """
    if stage not in OFFICIAL_VISION_LAYERS_PER_STAGE:
        raise ValueError(f"--hi_lora_stage must be one of {sorted(OFFICIAL_VISION_LAYERS_PER_STAGE)}, got {stage}")
    adapter = {"rank": rank, "alpha": alpha, "dropout": dropout}
    if mode == "paper":
        for i in paper_stage_layers(len(vision_blocks), stage):
            if not vision_blocks[i].attn.has_lora:
                add_attention_lora(vision_blocks[i].attn, **adapter, shared_dropout=True)
            _set_lora_trainable(vision_blocks[i].attn, True)
    elif mode == "official":
        hosts = [b.attn for b in vision_blocks + text_blocks + bridges]
        for host in hosts:
            if not host.has_lora:
                add_attention_lora(host, **adapter)
        n_vision = OFFICIAL_VISION_LAYERS_PER_STAGE[stage]
        for i, blk in enumerate(vision_blocks):
            _set_lora_trainable(blk.attn, i < n_vision)
        for blk in text_blocks:
            _set_lora_trainable(blk.attn, stage >= 1)
        for br in bridges:
            _set_lora_trainable(br.attn, True)
    else:
        raise ValueError(f"--hi_lora_mode must be 'paper' or 'official', got {mode!r}")


LORA_TARGETS = {"lora_in": "in_proj_weight", "lora_out": "out_proj.weight"}


@torch.no_grad()
def merge_lora_state_dict(state_dict: Dict[str, torch.Tensor], *, alpha: float) -> Dict[str, torch.Tensor]:
    """Fold every adapter found in a state dict into its weight (scale alpha / its rank) and drop the
    adapter keys.

    Used to start a paper-mode stage from the previous stage's checkpoint: earlier adapters are
    frozen for good, so they become part of the weights.
    """
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".lora_A")]:
        prefix, _ = key.rsplit(".", 1)
        host, kind = prefix.rsplit(".", 1)
        if kind not in LORA_TARGETS:
            raise KeyError(f"adapter {key} is not attached to an attention projection")
        a, b = out.pop(f"{prefix}.lora_A"), out.pop(f"{prefix}.lora_B")
        groups, _, rank = b.shape
        delta = torch.bmm(b.float(), a.float().view(groups, rank, -1)).flatten(0, 1) * (alpha / rank)
        target = f"{host}.{LORA_TARGETS[kind]}"
        out[target] = (out[target].float() + delta).to(out[target].dtype)
    return out
