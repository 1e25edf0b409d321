"""The model's command-line flags (the authors' names) and their one translation into a `HiVGConfig`.

A new knob is a `HiVGConfig` field; a JSON config under models/configs may set it by its name. If it also
gets a flag, that is one `add_model_args` line and, when the flag's name differs, one `FLAG_TO_CONFIG` row.
"""
import argparse
from dataclasses import fields
from typing import Optional

from datasets.registry import TEXT_LAYER_RULES

from .bridge import BRIDGE_ATTENTION_MODES
from .config import HiVGConfig, select_text_layers
from .configs import list_models, load_model_config
from .heads import HEADS, enabled_heads

# flag -> config field, for the flags that set a field as they are
FLAG_TO_CONFIG = {"imsize": "image_size", "max_query_len": "context_length", "mixup_pretrain": "mixup",
                  "bridge_attention": "bridge_attention", "vl_nheads": "fusion_heads",
                  "vl_enc_layers": "fusion_layers", "vl_dim_feedforward": "fusion_ffn",
                  "vl_dropout": "fusion_dropout", "normalize_before": "normalize_before",
                  "hi_lora_stage": "hi_lora_stage", "hi_lora_mode": "hi_lora_mode"}
# fields that build_config derives from several flags (a JSON config may not set them either)
DERIVED_FROM_FLAGS = ("text_layers", "adaptive_weights", "outputs")


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
    g.add_argument("--text_layers", choices=TEXT_LAYER_RULES, default=None,
                   help="text blocks feeding the bridges (paper section 3.2): the last, the middle and last, or all; "
                        "default: the --dataset's rule (datasets.registry; 'last' for jsonl, as RefCOCO's and "
                        "Flickr30k's short expressions)")
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


def build_config(args: argparse.Namespace, clip_cfg: Optional[dict] = None) -> HiVGConfig:
    """The config of the run `args` describes: the JSON config of `--model`, then the flags.

    `clip_cfg` replaces the JSON config's open_clip kwargs (a CLIP described by an HF config).
    """
    model_file = load_model_config(args.model)
    set_by_flags = sorted(set(model_file) & (set(FLAG_TO_CONFIG.values()) | set(DERIVED_FROM_FLAGS)))
    if set_by_flags:
        raise ValueError(f"--model {args.model}: entries {set_by_flags} are set by command-line flags, not by a "
                         "model config; remove them from the JSON file")
    clip_cfg = clip_cfg or model_file["clip"]
    D = clip_cfg["embed_dim"]
    if args.vl_hidden_dim not in (None, D):
        raise ValueError(f"--vl_hidden_dim {args.vl_hidden_dim} must equal the CLIP embedding width {D} of "
                         f"--model {args.model} (the fusion encoder runs at that width); omit the flag")
    values = {k: v for k, v in model_file.items() if k in {f.name for f in fields(HiVGConfig)}}
    values.update({field: getattr(args, flag) for flag, field in FLAG_TO_CONFIG.items()})
    if args.warmup and "warmup_bridge_layers" in model_file:
        values["bridge_layers"] = model_file["warmup_bridge_layers"]
    adaptive = not args.mixup_pretrain if args.enable_adaptive_weights is None else args.enable_adaptive_weights
    text_layers = [] if args.mixup_pretrain else select_text_layers(
        args.dataset, clip_cfg["text_cfg"].get("layers", 12), rule=getattr(args, "text_layers", None))
    return HiVGConfig(**{**values, "clip": clip_cfg, "bridge_layers": list(values["bridge_layers"]),
                         "extract_layers": list(values["extract_layers"]), "text_layers": text_layers,
                         "adaptive_weights": adaptive,
                         "outputs": enabled_heads(vars(args))})


def config_from_flags(flags: dict, clip_cfg: Optional[dict] = None) -> HiVGConfig:
    """The config of a run given its model flags as a dict (a flag it lacks takes its default; other
    entries are ignored): checkpoints that stored flags, and the authors' argparse values."""
    values = vars(add_model_args(argparse.ArgumentParser()).parse_args([]))
    values.update({k: v for k, v in flags.items() if k in values})
    return build_config(argparse.Namespace(**values), clip_cfg)


def default_config(model: str, **changes) -> HiVGConfig:
    """The config of `--model model` with every other flag at its default, then `changes` by field name:
    `HiVG(default_config("tiny", image_size=64, hi_lora_stage=1))` builds a model without argparse."""
    return config_from_flags({"model": model}).replace(**changes)
