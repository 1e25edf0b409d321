"""The command-line flags several tools take, each defined once (name, choices, default, help).

A tool adds the groups it uses to its parser (or to one of its argument groups); where a tool's default differs
from another's, it says so through the adder's keyword. Tool-specific flags stay in the tool.
"""
import argparse

DEVICES = ("auto", "cpu", "cuda")
AMP_DTYPES = ("none", "bf16", "fp16")


def add_device_arg(parser, default: str = "auto"):
    """--device: where the model runs (utils.distributed.resolve_device reads it)."""
    parser.add_argument("--device", default=default, choices=DEVICES, help="auto: CUDA when available, else CPU")
    return parser


def add_speed_args(parser):
    """--amp, --tf32, --compile: how a tool that runs the model on batches runs it (same model, other rounding)."""
    parser.add_argument("--amp", choices=AMP_DTYPES, default="none", help="autocast dtype (none: fp32 throughout)")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="TF32 tensor cores for fp32 matmuls and convolutions on CUDA (as timm and open_clip); "
                             "--no-tf32 for exact fp32; no effect on CPU")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the model that does the timed or repeated work (training: the training "
                             "steps, validation stays eager; evaluation: after LoRA merging); the first steps compile")
    return parser


def add_hf_clip_config_arg(parser, default=None):
    """--hf_clip_config: the CLIP of an authors' checkpoint that no --model config describes."""
    parser.add_argument("--hf_clip_config", default=default,
                        help="an authors' checkpoint whose CLIP is none of the registered --model configs: that "
                             "CLIP's architecture, as an HF CLIPConfig JSON file")
    return parser


def add_num_workers_arg(parser):
    """--num_workers: the data loader processes of a tool that reads a dataset."""
    parser.add_argument("--num_workers", type=int, default=2,
                        help="data loader processes per rank (0: load in the main process)")
    return parser
