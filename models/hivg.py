"""HiVG: assembly of the CLIP towers, bridges, fusion encoder and heads from a HiVGConfig, and `build_model(args)`.

Data flow (B images, T = 77 text tokens, N patches, D = CLIP embed width):

    text ids [B, T] -> text tower -> hidden states of selected layers -> bridges
                                  -> final-LN tokens @ text_projection -> text_proj   [B, T, D]
    image [B, 3, S, S] -> vision tower with bridges -> 4 block outputs [B, 1+N, 4 d_v]
                       -> visual_proj_multi -> visual_proj                          [B, 1+N, D]
    [REG] + visual + text -> fusion encoder -> the registered heads (models.heads.HEADS): box ([REG]),
                             contrastive (CLIP embeddings), token map / seg map (patches . EOT), ...
"""
from functools import partial
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import build_clip, encode_image, encode_text
from .bridge import CrossModalBridge
from .config import HiVGConfig
from .flags import build_config
from .fusion import FusionEncoder
from .heads import HEADS, REG_ATTENTION, Features, HeadDims, output_names
from .lora import apply_hi_lora
from .random_init import init_dct_patch_embedding, init_sincos_position_embedding


def patch_padding_mask(pixel_mask: torch.Tensor, grid) -> torch.Tensor:
    """pixel_mask [B, H, W] (1 = padding) -> [B, gh * gw] bool, as the official data pipeline.

    The integer mask is resized bilinearly with antialiasing, rounded half-to-even, and a patch is
    padding where the rounded value is non-zero (torchvision's Resize on the int32 collate mask).
    """
    m = F.interpolate(pixel_mask.float()[:, None], size=tuple(grid), mode="bilinear",
                      antialias=True, align_corners=False)
    return torch.round(m).flatten(1) != 0


def exact_patch_padding_mask(pixel_mask: torch.Tensor, grid) -> torch.Tensor:
    """`patch_padding_mask` in integer arithmetic, the same on every backend (an exported graph's resize
    rounds a patch half covered by padding either way): for a patch side p, the antialiased bilinear weight of a
    pixel is proportional to the integer 2p - |2t - p + 1| (t its offset from the patch's first pixel) and
    renormalised over the pixels inside the image, so a patch is padding where 2 sum(mask w) > sum(w); the
    sums stay below 2**24, exact in fp32. Equals `patch_padding_mask` where its weights are dyadic (p a power
    of two: the tiny models' 8, B/16's 16); for other p it is the exact rule that one approximates."""
    p = pixel_mask.shape[-1] // grid[1]
    t = torch.arange(2 * p, dtype=torch.float32, device=pixel_mask.device) - p // 2
    w = 2 * p - (2 * t - p + 1).abs()
    kernel = (w[:, None] * w[None, :])[None, None]                        # [1, 1, 2p, 2p]
    m = pixel_mask.float()[:, None]
    covered = F.conv2d(m, kernel, stride=p, padding=p // 2)
    inside = F.conv2d(torch.ones_like(m[:1]), kernel, stride=p, padding=p // 2)
    return (2 * covered > inside).flatten(1)


@partial(torch.compiler.disable, reason="the batch's text length is data-dependent (read on the host)")
def text_length(eot_pos: torch.Tensor) -> int:
    """Tokens up to the batch's last EOT. A data-dependent size read on the host (one sync), so under
    torch.compile the graph breaks here on purpose: towers and bridges form one graph, the fusion
    encoder and heads another (recompiled once with a symbolic length when the length first changes)."""
    return int(eot_pos.max()) + 1


def layers_out_of_range(clip_cfg: dict, bridge_layers: Sequence[int], extract_layers: Sequence[int],
                        text_layers: Sequence[int]) -> str:
    """'' when every selected block exists in the towers `clip_cfg` describes, else what does not (one line)."""
    towers = {"vision": clip_cfg["vision_cfg"].get("layers", 12), "text": clip_cfg["text_cfg"].get("layers", 12)}
    return "; ".join(f"{name} layers {list(layers)} out of range for the {towers[tower]}-layer {tower} tower"
                     for name, layers, tower in (("bridge", bridge_layers, "vision"),
                                                 ("extract", extract_layers, "vision"), ("text", text_layers, "text"))
                     if any(not 0 <= i < towers[tower] for i in layers))


def known_outputs(names: Iterable[str]) -> set:
    """`names` as a set, or a ValueError naming those no registered head (nor REG_ATTENTION) provides."""
    names = set(names)
    unknown = names - set(output_names())
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {list(output_names())} (a head of "
                         "your own is registered with models.heads.register_head before the model is built)")
    return names


def config_layers_out_of_range(cfg: HiVGConfig) -> str:
    """`layers_out_of_range` of the blocks `cfg` selects in its own CLIP."""
    return layers_out_of_range(cfg.clip, cfg.bridge_layers, cfg.extract_layers, text_layers=cfg.text_layers)


def check_config(config: HiVGConfig) -> None:
    """Refuse a config whose bridge variant or layer choices cannot be built (one line, naming the flag)."""
    if config.adaptive_weights and config.mixup:
        raise ValueError("--enable_adaptive_weights cannot be combined with --mixup_pretrain (the bridge "
                         "input of mixup pre-training is already vision-wide); drop one of the two flags")
    if not config.adaptive_weights and not config.mixup:
        raise ValueError("without --enable_adaptive_weights the bridge takes the projected text of "
                         "--mixup_pretrain; pass --enable_adaptive_weights for fine-tuning")
    out_of_range = config_layers_out_of_range(config)
    if out_of_range:
        raise ValueError(out_of_range)


class HiVG(nn.Module):
    """Visual grounding on CLIP with multi-layer adaptive cross-modal bridges and Hi LoRA.

    Built from its `HiVGConfig` (models/config.py: every field documented there), at the config's Hi LoRA
    stage, with random weights; the config is kept as `model.config`. `grad_checkpointing` recomputes the
    CLIP blocks in backward (a way to run, not part of the network).
    """

    def __init__(self, config: HiVGConfig, *, grad_checkpointing: bool = False):
        super().__init__()
        check_config(config)
        self.config = config
        self.clip = build_clip(config.clip)
        vis, txt = self.clip.visual, self.clip.transformer
        d_v, d_t = vis.transformer.width, txt.width
        D = config.clip["embed_dim"]
        image_size, context_length = config.image_size, config.context_length
        if context_length > self.clip.context_length:
            raise ValueError(f"--max_query_len {context_length} exceeds CLIP's context length "
                             f"{self.clip.context_length}")
        patch = vis.patch_size[0]
        if image_size % patch:
            raise ValueError(f"--imsize {image_size} is not a multiple of the patch size {patch}")
        self.image_size, self.context_length = image_size, context_length
        self.grid = (image_size // patch, image_size // patch)
        self.num_patches = self.grid[0] * self.grid[1]
        self.bridge_layers, self.extract_layers = list(config.bridge_layers), list(config.extract_layers)
        self.text_layers = [] if config.mixup else list(config.text_layers)
        self.mixup = config.mixup
        wanted = known_outputs(config.outputs) | {"box"}
        self.outputs = tuple(name for name in output_names() if name in wanted)
        self.grad_checkpointing = grad_checkpointing

        blk = vis.transformer.resblocks[0]
        self.bridges = nn.ModuleDict({
            str(i): CrossModalBridge(width=d_v, heads=blk.attn.num_heads, mlp_width=blk.mlp.c_fc.out_features,
                                     text_width=d_t, num_text_layers=max(len(self.text_layers), 1),
                                     context_length=context_length, adaptive_weights=config.adaptive_weights,
                                     bridge_attention=config.bridge_attention)
            for i in self.bridge_layers})
        self.mixup_text_proj = nn.Linear(D, d_v) if config.mixup else None
        self.visual_proj_multi = nn.Linear(len(self.extract_layers) * d_v, D)
        self.visual_proj = nn.Linear(D, D)
        self.text_proj = nn.Linear(D, D)
        self.reg_token = nn.Embedding(1, D)
        self.pos_embed = nn.Embedding(2 + self.num_patches + context_length, D)
        self.fusion = FusionEncoder(width=D, fusion_heads=config.fusion_heads, fusion_layers=config.fusion_layers,
                                    fusion_ffn=config.fusion_ffn, fusion_dropout=config.fusion_dropout,
                                    normalize_before=config.normalize_before)
        dims = HeadDims(width=D, token_mlp_width=config.token_mlp_width, grid=self.grid)
        for spec in HEADS.values():  # every registered head's module, so checkpoints hold them whatever trains
            if spec.build is not None:
                self.add_module(spec.module, spec.build(dims))
        self.reset_visual_projection()
        self.set_stage(config.hi_lora_stage, config.hi_lora_mode)
        if config.patch_embed_init == "dct":
            init_dct_patch_embedding(vis)
        if config.pos_embed_init == "sincos":
            init_sincos_position_embedding(vis, config.pos_embed_temperature, config.pos_embed_scale)

    @torch.no_grad()
    def reset_visual_projection(self) -> None:
        """Initialise the multi-level projection as side-by-side copies of CLIP's visual projection.

        Call again after loading CLIP weights (the official code builds it from the loaded CLIP).
        """
        proj_t = self.clip.visual.proj.t()
        self.visual_proj_multi.weight.copy_(torch.cat([proj_t] * len(self.extract_layers), dim=1))

    def text_tower_trains(self) -> bool:
        clip = self.clip
        parts = (clip.transformer, clip.token_embedding, clip.ln_final)
        return any(p.requires_grad for m in parts for p in m.parameters()) or \
            clip.positional_embedding.requires_grad or clip.text_projection.requires_grad

    def forward(self, images: torch.Tensor, pixel_mask: torch.Tensor, ids: torch.Tensor,
                outputs: Optional[Iterable[str]] = None, *, for_export: bool = False) -> Dict[str, torch.Tensor]:
        """images [B, 3, S, S], pixel_mask [B, S, S] (1 = padding), ids [B, T] token ids.

        Returns a dict with `pred_box` [B, 4] (cx, cy, w, h in [0, 1]) and, when asked for (default:
        the heads of `self.outputs`), the other heads' outputs (models.heads.HEADS): `logits_per_text` [B, B],
        `token_map` [B, N], `seg_map` [B, 1, 8 gh, 8 gw], ...; and only on request `reg_attention` [B, N]:
        the last fusion layer's [REG] attention over the patches (mean over heads, renormalised over the patches).
        `for_export` (models/export.py) runs all T text tokens through the fusion encoder instead of those up to
        the batch's last EOT (the same result: the rest are masked keys) without the host read, and takes the
        patch padding mask in exact arithmetic (`exact_patch_padding_mask`).
        """
        want = known_outputs(self.outputs if outputs is None else outputs)
        clip = self.clip
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_tower_trains()):
            text = encode_text(clip, ids, self.text_layers, use_checkpoint=self.grad_checkpointing)
            text_tokens = text.tokens @ clip.text_projection
        bridge_text = [self.mixup_text_proj(text_tokens)] if self.mixup else \
            [text.hidden[i] for i in self.text_layers]
        bridges = {int(i): partial(b, text_states=bridge_text) for i, b in self.bridges.items()}
        vis = encode_image(clip, images, self.extract_layers, bridges=bridges, use_checkpoint=self.grad_checkpointing)
        if vis.grid != self.grid:
            raise ValueError(f"images of {tuple(images.shape[-2:])} give a {vis.grid} patch grid; the model "
                             f"was built for --imsize {self.image_size}")

        B = images.shape[0]
        # Text positions after the batch's last EOT are padding for every sample: masked as keys and
        # never read as outputs, so the fusion encoder can leave them out without changing anything.
        eot_pos = ids.argmax(dim=-1)
        T = ids.shape[1] if for_export else text_length(eot_pos)
        visual = self.visual_proj(self.visual_proj_multi(torch.cat(vis.layers, dim=-1)))
        text_src = self.text_proj(text_tokens[:, :T])
        tokens = torch.cat([self.reg_token.weight.expand(B, 1, -1), visual, text_src], dim=1)
        never = torch.zeros(B, 2, dtype=torch.bool, device=ids.device)
        patch_pad = (exact_patch_padding_mask if for_export else patch_padding_mask)(pixel_mask, vis.grid)
        pad = torch.cat([never, patch_pad, ids[:, :T] == 0], dim=1)
        hs, reg_attn = self.fusion(tokens, self.pos_embed.weight, pad,
                                   reg_attention=REG_ATTENTION in want)

        feats = Features(states=hs, grid=vis.grid, eot_pos=eot_pos, image_pooled=vis.pooled, text_eot=text.eot,
                         clip=clip)
        out = {}
        for name, spec in HEADS.items():
            if name == "box" or name in want:
                out.update(spec.compute(getattr(self, spec.module) if spec.module else None, feats))
        if reg_attn is not None:  # over the patches only, renormalised to sum to 1
            patch_attn = reg_attn[:, 2:2 + self.num_patches]
            out[REG_ATTENTION] = patch_attn / patch_attn.sum(dim=-1, keepdim=True)
        return out

    def freeze_heads_without_loss(self) -> None:
        """Heads outside `outputs` get no gradient in training; freezing them keeps DDP from waiting on them."""
        for name, spec in HEADS.items():
            if spec.module:
                getattr(self, spec.module).requires_grad_(name in self.outputs)

    def set_stage(self, stage: int, mode: str = "paper") -> None:
        """Freeze CLIP, add this Hi LoRA stage's adapters (rank, alpha and dropout of `self.config`) and mark
        exactly its parameters trainable.

        Everything outside the CLIP towers (bridges, projections, fusion encoder, heads) trains.
        """
        for p in self.clip.parameters():
            p.requires_grad_(False)
        apply_hi_lora(list(self.clip.visual.transformer.resblocks), list(self.clip.transformer.resblocks),
                      list(self.bridges.values()), stage=stage, mode=mode, rank=self.config.lora_rank,
                      alpha=self.config.lora_alpha, dropout=self.config.lora_dropout)
        for p in self.bridges.parameters():
            p.requires_grad_(True)
        self.hi_lora_stage, self.hi_lora_mode = stage, mode


def checked_config(args, clip_cfg: Optional[dict] = None) -> HiVGConfig:
    """The config the model flags describe (`models.flags.build_config`), or a ValueError naming the flags when
    it selects blocks its CLIP lacks. `clip_cfg` replaces the JSON config's open_clip kwargs (the CLIP of the
    checkpoint a run starts from, or one described by an HF config)."""
    config = build_config(args, clip_cfg)
    out_of_range = config_layers_out_of_range(config)
    if out_of_range and clip_cfg is not None:
        start = next((f"--{flag} {getattr(args, flag)}" for flag in ("retrain", "hi_lora_retrain")
                      if getattr(args, flag, "")), "the checkpoint this run starts from")
        raise ValueError(f"--model {args.model} selects blocks its CLIP, that of {start}, does not have: "
                         f"{out_of_range}; pass the --model that checkpoint was trained with")
    if out_of_range:
        raise ValueError(f"--model {args.model}: its config selects blocks its own CLIP does not have: "
                         f"{out_of_range}; fix the config's bridge_layers / extract_layers")
    return config


def build_model(args, clip_cfg: Optional[dict] = None) -> HiVG:
    """The model the flags describe (`checked_config`), with random CLIP weights (callers load weights
    afterwards, see models.weights)."""
    return HiVG(checked_config(args, clip_cfg), grad_checkpointing=args.grad_checkpointing)
