"""`HiVGConfig`: everything that defines a HiVG network, as plain values.

A checkpoint stores its config (`HiVGConfig.to_dict()`, plain values that load with weights_only=True), so
it rebuilds exactly the network that wrote it, whatever the JSON files under models/configs say later.
The JSON files and the command-line flags are only read once, by `models.flags.build_config`, when a run
starts. A field's name is the knob's one name: in the JSON files, in stored configs and on the module.
"""
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

from datasets.registry import TEXT_LAYER_RULES, dataset_spec

STEM_INITS = {"pos_embed_init": ("open_clip", "sincos"), "patch_embed_init": ("open_clip", "dct")}


@dataclass
class HiVGConfig:
    """The network: CLIP towers, bridges (paper section 3.2), fusion encoder and heads (section 3.4),
    Hi LoRA stage (section 3.3).

    clip: open_clip `CLIP` kwargs (embed_dim, vision_cfg, text_cfg, quick_gelu).
    bridge_layers / extract_layers: 0-based vision blocks with a bridge / feeding the fusion encoder.
    text_layers: text blocks whose hidden states feed the bridges (empty with `mixup`).
    image_size: input side S; context_length: text length T.
    outputs: heads computed by default (names of models.heads.HEADS; "box" always).
    pos_embed_init: "sincos" starts a random CLIP's vision position table as a 2-D sine-cosine table,
        of frequencies down to 1 / pos_embed_temperature and pos_embed_scale times the patch features' std.
    patch_embed_init: "dct" starts a random CLIP's patch projection as a 2-D DCT (models.random_init).
    lora_rank, lora_alpha, lora_dropout: the Hi LoRA adapters (rank r, update scale alpha / r).
    """
    clip: dict
    bridge_layers: List[int]
    extract_layers: List[int]
    text_layers: List[int]
    image_size: int = 224
    context_length: int = 77
    adaptive_weights: bool = True
    mixup: bool = False
    bridge_attention: str = "per_sample"
    fusion_heads: int = 8
    fusion_layers: int = 6
    fusion_ffn: int = 2048
    fusion_dropout: float = 0.1
    normalize_before: bool = True
    token_mlp_width: int = 3072
    outputs: List[str] = field(default_factory=lambda: ["box"])
    hi_lora_stage: int = 0
    hi_lora_mode: str = "paper"
    lora_rank: int = 32
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    pos_embed_init: str = "open_clip"
    pos_embed_temperature: float = 10000.0
    pos_embed_scale: float = 1.0
    patch_embed_init: str = "open_clip"
    name: str = ""

    def __post_init__(self):
        for key, choices in STEM_INITS.items():
            if getattr(self, key) not in choices:
                raise ValueError(f"model config: {key} {getattr(self, key)!r} is not one of {list(choices)}")

    def to_dict(self) -> dict:
        """Plain Python values only (dicts, lists, str, int, float, bool)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "HiVGConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"model config has unknown entries {unknown}: it was written by a newer version "
                             "of this code")
        return cls(**values)

    def replace(self, **changes) -> "HiVGConfig":
        """A copy with `changes` applied (None values ignored)."""
        values = self.to_dict()
        values.update({k: v for k, v in changes.items() if v is not None})
        return HiVGConfig.from_dict(values)


def select_text_layers(dataset: str, num_layers: int, rule: Optional[str] = None) -> List[int]:
    """Text blocks feeding the bridge for a dataset (paper section 3.2), by `rule` (one of
    datasets.registry.TEXT_LAYER_RULES) or else its rule in datasets.registry.DATASETS: 12 layers -> [11], [5, 11]
    or all. ValueError naming the datasets for one the table lacks, or the rules for another rule."""
    if rule is not None and rule not in TEXT_LAYER_RULES:
        raise ValueError(f"--text_layers {rule!r}: choose one of {', '.join(TEXT_LAYER_RULES)}")
    rule = rule or dataset_spec(dataset).text_layers
    if rule == "all":
        return list(range(num_layers))
    if rule == "middle_last":
        return [num_layers // 2 - 1, num_layers - 1]
    return [num_layers - 1]


