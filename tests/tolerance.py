"""Tolerance of fp32 results compared with values recorded on another machine (tests/fixtures, tests/checkpoints).

Another CPU runs other kernels (PyTorch picks them by ATEN_CPU_CAPABILITY: default, avx2, avx512; other BLAS
blockings and thread counts too): the same sums in another order. Each rounding is at most half an ulp (eps =
2**-23 relative), so a sum or dot product taken in another order differs by a few ulps of its largest terms, and
each layer passes the difference on to the next: after `depth` layers an output whose values are up to |v| may
move by about ULPS * eps * depth * |v|, with |v| the largest magnitude of the compared tensor (the rounding
scales with the largest terms, not with a result that cancels to near zero). Measured on the legacy
checkpoint's outputs (8 layers): at most 7.5 ulps of |v| under the three capabilities, against the 32 allowed.
"""
import torch

EPS = torch.finfo(torch.float32).eps     # 2**-23
ULPS = 4                                 # rounding of one layer: a few ulps of its largest values


def fp32_atol(expected: torch.Tensor, depth: int, scale: float = 0.0) -> float:
    """Absolute tolerance of an fp32 result of `depth` layers (or accumulated operations) recorded as `expected`.

    `scale`: the largest magnitude the result's terms reach when the result itself cancels below it, e.g. CLIP's
    logit scale for its logits (a cosine of unit vectors whose products sum, in absolute value, up to 1)."""
    return ULPS * EPS * depth * max(expected.detach().abs().max().item(), scale)


def model_depth(config) -> int:
    """Layers on the longest path of a HiVG forward (a HiVGConfig): the CLIP tower blocks (the text tower runs
    beside the vision tower, into its bridges), the fusion blocks and a head."""
    towers = config.clip["vision_cfg"]["layers"], config.clip["text_cfg"]["layers"]
    return max(towers) + config.fusion_layers + 1


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, depth: int, name: str, scale: float = 0.0):
    torch.testing.assert_close(actual, expected, rtol=0, atol=fp32_atol(expected, depth, scale),
                               msg=lambda report: f"{name} (depth {depth}): {report}")
