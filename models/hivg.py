"""HiVG: assembly of the CLIP towers, bridges, fusion encoder and heads, and `build_model(args)`.

Data flow (B images, T = 77 text tokens, N patches, D = CLIP embed width):

    text ids [B, T] -> text tower -> hidden states of selected layers -> bridges
                                  -> final-LN tokens @ text_projection -> text_proj   [B, T, D]
    image [B, 3, S, S] -> vision tower with bridges -> 4 block outputs [B, 1+N, 4 d_v]
                       -> visual_proj_multi -> visual_proj                          [B, 1+N, D]
    [REG] + visual + text -> fusion encoder -> the registered heads (models.heads.HEADS): box ([REG]),
                             contrastive (CLIP embeddings), token map / seg map (patches . EOT), ...
"""
import argparse
from functools import partial
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import build_clip, encode_image, encode_text
from .bridge import BRIDGE_ATTENTION_MODES, CrossModalBridge
from .config import HiVGConfig, build_config
from .configs import list_models
from .fusion import FusionEncoder
from .heads import HEADS, REG_ATTENTION, Features, HeadDims, output_names
from .lora import DROPOUT, apply_hi_lora
from .random_init import init_dct_patch_embedding, init_sincos_position_embedding


def patch_padding_mask(pixel_mask: torch.Tensor, grid) -> torch.Tensor:
    """pixel_mask [B, H, W] (1 = padding) -> [B, gh * gw] bool, as the official data pipeline.

    The integer mask is resized bilinearly with antialiasing, rounded half-to-even, and a patch is
    padding where the rounded value is non-zero (torchvision's Resize on the int32 collate mask).
    """
    m = F.interpolate(pixel_mask.float()[:, None], size=tuple(grid), mode="bilinear",
                      antialias=True, align_corners=False)
    return torch.round(m).flatten(1) != 0


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
    return layers_out_of_range(cfg.clip, cfg.bridge_layers, cfg.extract_layers, cfg.text_layers)


class HiVG(nn.Module):
    """Visual grounding on CLIP with multi-layer adaptive cross-modal bridges and Hi LoRA.

    Args:
        clip_cfg: open_clip CLIP kwargs (embed_dim, vision_cfg, text_cfg, quick_gelu).
        bridge_layers: vision blocks (0-based) that carry a bridge after their attention.
        extract_layers: vision blocks whose outputs feed the fusion encoder (concatenated).
        text_layers: text blocks whose outputs feed the bridges (ignored with `mixup`).
        image_size: input side S; the fusion position table has 2 + (S / patch)^2 + T rows.
        context_length: text length T (<= the CLIP context length).
        adaptive_weights, mixup, bridge_attention: bridge variants (docs/method.md, section 2).
        fusion_*: fusion encoder size; normalize_before selects pre-norm (+ final LN).
        outputs: heads computed by default, names from models.heads.output_names() ("box" always included);
            None: all of them.
    """

    def __init__(self, clip_cfg: dict, bridge_layers: Sequence[int], extract_layers: Sequence[int],
                 text_layers: Sequence[int], image_size: int, context_length: int = 77,
                 adaptive_weights: bool = True, mixup: bool = False, bridge_attention: str = "per_sample",
                 fusion_heads: int = 8, fusion_layers: int = 6, fusion_ffn: int = 2048,
                 fusion_dropout: float = 0.1, normalize_before: bool = True, token_mlp_width: int = 3072,
                 outputs: Optional[Iterable[str]] = None, grad_checkpointing: bool = False):
        super().__init__()
        if adaptive_weights and mixup:
            raise ValueError("--enable_adaptive_weights cannot be combined with --mixup_pretrain (the bridge "
                             "input of mixup pre-training is already vision-wide); drop one of the two flags")
        if not adaptive_weights and not mixup:
            raise ValueError("without --enable_adaptive_weights the bridge takes the projected text of "
                             "--mixup_pretrain; pass --enable_adaptive_weights for fine-tuning")
        out_of_range = layers_out_of_range(clip_cfg, bridge_layers, extract_layers, text_layers)
        if out_of_range:
            raise ValueError(out_of_range)
        self.clip = build_clip(clip_cfg)
        vis, txt = self.clip.visual, self.clip.transformer
        d_v, d_t = vis.transformer.width, txt.width
        D = clip_cfg["embed_dim"]
        if context_length > self.clip.context_length:
            raise ValueError(f"--max_query_len {context_length} exceeds CLIP's context length "
                             f"{self.clip.context_length}")
        patch = vis.patch_size[0]
        if image_size % patch:
            raise ValueError(f"--imsize {image_size} is not a multiple of the patch size {patch}")
        self.image_size, self.context_length = image_size, context_length
        self.grid = (image_size // patch, image_size // patch)
        self.num_patches = self.grid[0] * self.grid[1]
        self.bridge_layers, self.extract_layers = list(bridge_layers), list(extract_layers)
        self.text_layers = [] if mixup else list(text_layers)
        self.mixup = mixup
        wanted = known_outputs(output_names() if outputs is None else outputs) | {"box"}
        self.outputs = tuple(name for name in output_names() if name in wanted)
        self.grad_checkpointing = grad_checkpointing

        blk = vis.transformer.resblocks[0]
        self.bridges = nn.ModuleDict({
            str(i): CrossModalBridge(d_v, blk.attn.num_heads, blk.mlp.c_fc.out_features, d_t,
                                     max(len(self.text_layers), 1), context_length, adaptive_weights,
                                     bridge_attention)
            for i in self.bridge_layers})
        self.mixup_text_proj = nn.Linear(D, d_v) if mixup else None
        self.visual_proj_multi = nn.Linear(len(self.extract_layers) * d_v, D)
        self.visual_proj = nn.Linear(D, D)
        self.text_proj = nn.Linear(D, D)
        self.reg_token = nn.Embedding(1, D)
        self.pos_embed = nn.Embedding(2 + self.num_patches + context_length, D)
        self.fusion = FusionEncoder(D, fusion_heads, fusion_layers, fusion_ffn, fusion_dropout, normalize_before)
        dims = HeadDims(width=D, token_mlp_width=token_mlp_width, grid=self.grid)
        for spec in HEADS.values():  # every registered head's module, so checkpoints hold them whatever trains
            if spec.build is not None:
                self.add_module(spec.module, spec.build(dims))
        self.reset_visual_projection()

    @classmethod
    def from_config(cls, cfg: HiVGConfig, grad_checkpointing: bool = False) -> "HiVG":
        """The network `cfg` describes, at its Hi LoRA stage, with random weights."""
        model = cls(cfg.clip, cfg.bridge_layers, cfg.extract_layers, cfg.text_layers, cfg.image_size,
                    cfg.context_length, cfg.adaptive_weights, cfg.mixup, cfg.bridge_attention, cfg.fusion_heads,
                    cfg.fusion_layers, cfg.fusion_ffn, cfg.fusion_dropout, cfg.normalize_before,
                    cfg.token_mlp_width, cfg.outputs, grad_checkpointing)
        model.set_stage(cfg.hi_lora_stage, cfg.hi_lora_mode, cfg.lora_dropout)
        if cfg.patch_embed_init == "dct":
            init_dct_patch_embedding(model.clip.visual)
        if cfg.pos_embed_init == "sincos":
            init_sincos_position_embedding(model.clip.visual, cfg.pos_embed_temperature, cfg.pos_embed_scale)
        model.config = cfg
        return model

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
                outputs: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
        """images [B, 3, S, S], pixel_mask [B, S, S] (1 = padding), ids [B, T] token ids.

        Returns a dict with `pred_box` [B, 4] (cx, cy, w, h in [0, 1]) and, when asked for (default:
        the heads of `self.outputs`), the other heads' outputs (models.heads.HEADS): `logits_per_text` [B, B],
        `token_map` [B, N], `seg_map` [B, 1, 8 gh, 8 gw], ...; and only on request `reg_attention` [B, N]:
        the last fusion layer's [REG] attention over the patches (mean over heads, renormalised over the patches).
        """
        want = known_outputs(self.outputs if outputs is None else outputs)
        clip = self.clip
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_tower_trains()):
            text = encode_text(clip, ids, self.text_layers, self.grad_checkpointing)
            text_tokens = text.tokens @ clip.text_projection
        bridge_text = [self.mixup_text_proj(text_tokens)] if self.mixup else \
            [text.hidden[i] for i in self.text_layers]
        bridges = {int(i): partial(b, text_states=bridge_text) for i, b in self.bridges.items()}
        vis = encode_image(clip, images, self.extract_layers, bridges, self.grad_checkpointing)
        if vis.grid != self.grid:
            raise ValueError(f"images of {tuple(images.shape[-2:])} give a {vis.grid} patch grid; the model "
                             f"was built for --imsize {self.image_size}")

        B = images.shape[0]
        # Text positions after the batch's last EOT are padding for every sample: masked as keys and
        # never read as outputs, so the fusion encoder can leave them out without changing anything.
        eot_pos = ids.argmax(dim=-1)
        T = text_length(eot_pos)
        visual = self.visual_proj(self.visual_proj_multi(torch.cat(vis.layers, dim=-1)))
        text_src = self.text_proj(text_tokens[:, :T])
        tokens = torch.cat([self.reg_token.weight.expand(B, 1, -1), visual, text_src], dim=1)
        never = torch.zeros(B, 2, dtype=torch.bool, device=ids.device)
        pad = torch.cat([never, patch_padding_mask(pixel_mask, vis.grid), ids[:, :T] == 0], dim=1)
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

    def set_stage(self, stage: int, mode: str = "paper", lora_dropout: float = DROPOUT) -> None:
        """Freeze CLIP, add this Hi LoRA stage's adapters and mark exactly its parameters trainable.

        Everything outside the CLIP towers (bridges, projections, fusion encoder, heads) trains.
        """
        for p in self.clip.parameters():
            p.requires_grad_(False)
        apply_hi_lora(list(self.clip.visual.transformer.resblocks), list(self.clip.transformer.resblocks),
                      list(self.bridges.values()), stage, mode, lora_dropout)
        for p in self.bridges.parameters():
            p.requires_grad_(True)
        self.hi_lora_stage, self.hi_lora_mode = stage, mode


def add_model_args(parser: argparse.ArgumentParser, shared: bool = True) -> argparse.ArgumentParser:
    """Model flags, with the authors' names; defaults follow the paper.

    `shared=False` leaves out --dataset, --imsize and --max_query_len, for a parser that has them from
    datasets.add_data_args already.
    """
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="ViT-B/16", help=f"backbone config: one of {list_models()} or a JSON file")
    if shared:
        g.add_argument("--dataset", default="referit", help="selects the text layers feeding the bridge")
        g.add_argument("--imsize", type=int, default=224, help="input side S of the padded square image")
        g.add_argument("--max_query_len", type=int, default=77, help="text context length in tokens")
    g.add_argument("--warmup", action="store_true", help="ViT-L/14: first run without bridges")
    g.add_argument("--mixup_pretrain", action="store_true", help="mixup pre-training bridge (no adaptive weights)")
    g.add_argument("--enable_adaptive_weights", action=argparse.BooleanOptionalAction, default=None,
                   help="adaptive weights in the bridge (default: on, off with --mixup_pretrain)")
    g.add_argument("--bridge_attention", choices=BRIDGE_ATTENTION_MODES, default="per_sample",
                   help="per_sample (paper) or official (the release's batch-mixing reshape)")
    g.add_argument("--hi_lora_stage", type=int, default=0, choices=[0, 1, 2, 3], help="Hi LoRA stage (0: bridges only)")
    g.add_argument("--hi_lora_mode", choices=("paper", "official"), default="paper",
                   help="paper: new adapters per stage on groups of layers; official: the authors' layout")
    g.add_argument("--vl_hidden_dim", type=int, default=None, help="fusion width; must equal CLIP's embed width")
    g.add_argument("--vl_nheads", type=int, default=8, help="fusion encoder heads")
    g.add_argument("--vl_enc_layers", type=int, default=6, help="fusion encoder layers")
    g.add_argument("--vl_dim_feedforward", type=int, default=2048, help="fusion encoder FFN width")
    g.add_argument("--vl_dropout", type=float, default=0.1, help="fusion encoder dropout")
    g.add_argument("--normalize_before", action=argparse.BooleanOptionalAction, default=True,
                   help="pre-norm fusion encoder with a final LayerNorm")
    for spec in HEADS.values():  # one switch per registered head that has one
        if spec.flag:
            g.add_argument(f"--{spec.flag}", action="store_true", help=spec.flag_help)
    g.add_argument("--grad_checkpointing", action="store_true", help="recompute CLIP blocks in backward")
    return parser


def build_model(args, clip_cfg: Optional[dict] = None) -> HiVG:
    """The model the flags describe, with random CLIP weights (callers load weights afterwards, see
    models.weights). `clip_cfg` replaces the JSON config's open_clip kwargs (a CLIP from an HF config)."""
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
    return HiVG.from_config(config, grad_checkpointing=args.grad_checkpointing)


def config_from_flags(flags: dict, clip_cfg: Optional[dict] = None) -> HiVGConfig:
    """The config of a run given its model flags as a dict (a flag it lacks takes its default; other
    entries are ignored): checkpoints that stored flags, and the authors' argparse values."""
    values = vars(add_model_args(argparse.ArgumentParser()).parse_args([]))
    values.update({k: v for k, v in flags.items() if k in values})
    return build_config(argparse.Namespace(**values), clip_cfg)
