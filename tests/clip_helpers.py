"""HF CLIP files for the tests to read: open_clip state dicts renamed through the inverse of the library's
rename table (models.convert_clip), which itself only reads HF names."""
from torch import Tensor

from models.convert_clip import _QKV_SLOTS, _RULES


def open_clip_key_to_hf(key: str) -> tuple[str, str]:
    """open_clip key -> (HF key template with {s} still unfilled for q/k/v, rule kind)."""
    for _, hf_template, oc_regex, _, kind in _RULES:
        match = oc_regex.fullmatch(key)
        if match:
            fields = dict(match.groupdict(), s="{s}")
            return hf_template.format(**fields), kind
    raise ValueError(f"unexpected key {key!r} in open_clip CLIP state dict (no HF equivalent)")


def open_clip_to_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of ``hf_to_open_clip``: split in_proj into q/k/v, transpose the projections.

    ``position_ids`` buffers are not recreated.
    """
    converted: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        hf_key, kind = open_clip_key_to_hf(key)
        if kind == "qkv":
            for name, part in zip(_QKV_SLOTS, tensor.chunk(3, dim=0)):
                converted[hf_key.format(s=name)] = part
        else:
            converted[hf_key] = tensor.t().contiguous() if kind == "transpose" else tensor
    return converted
