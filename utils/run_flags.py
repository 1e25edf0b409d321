"""The flags of a training run over plain dicts: their valid values, and what a run that starts from a
checkpoint (--resume, --hi_lora_retrain) inherits."""
import math
from pathlib import Path
from typing import Callable

from utils.errors import UserError

# Flags that describe one run, never inherited from the checkpoint a run starts from.
RUN_ONLY = ("output_dir", "resume", "retrain", "hi_lora_retrain", "hi_lora_clip", "clip_model", "hf_clip_config",
            "hi_lora_stage", "run_epochs", "device", "num_workers", "overwrite")
LAST_STAGE = 3
# What a resumed run may change: where and how it runs, not what it trains.
RESUMABLE = ("resume", "output_dir", "overwrite", "run_epochs", "device", "num_workers", "print_freq", "data_root",
             "split_root", "eval_batch_size", "compile", "tf32")
# What a Hi LoRA stage keeps from the stage it inherits: the adapter layout and bridge its weights were trained with.
STAGE_MODE = ("hi_lora_mode", "bridge_attention")

_NOT_GIVEN = object()

# flag -> (test, the valid values in words). NaN fails every comparison, so it is refused with the rest.
RANGES = {
    "epochs": (lambda v: v >= 1, "at least 1"),
    "run_epochs": (lambda v: v >= 0, "0 (every epoch of --epochs) or more"),
    "epoch_samples": (lambda v: v >= 0, "0 (the whole split) or more"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "accum_steps": (lambda v: v >= 1, "at least 1"),
    "eval_batch_size": (lambda v: v >= 0, "0 (--batch_size) or more"),
    "lr": (lambda v: 0 <= v < math.inf, "a finite number, 0 or more"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "a finite number, 0 or more"),
    "lr_drop": (lambda v: v >= 1, "at least 1 (epochs between drops)"),
    "lr_power": (lambda v: 0 <= v < math.inf, "a finite number, 0 or more"),
    "lr_exponential": (lambda v: 0 < v < math.inf, "a finite number above 0"),
    "clip_max_norm": (lambda v: 0 <= v < math.inf, "0 (no clipping) or a finite positive number"),
    "imsize": (lambda v: v >= 1, "a positive multiple of the model's patch size, e.g. 224"),
    "max_query_len": (lambda v: v >= 2, "at least 2 (start and end of text) and at most CLIP's context length (77)"),
    "vl_nheads": (lambda v: v >= 1, "at least 1"),
    "vl_enc_layers": (lambda v: v >= 0, "0 or more"),
    "vl_dim_feedforward": (lambda v: v >= 1, "at least 1"),
    "vl_dropout": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "num_workers": (lambda v: v >= 0, "0 (load in the main process) or more"),
    "print_freq": (lambda v: v >= 0, "0 (no progress lines) or more"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "from 0 to 2**32 - 1"),
}


def check_ranges(flags: dict) -> None:
    """A UserError naming the first flag of RANGES whose value is outside its valid values."""
    for flag, (valid, values) in RANGES.items():
        if not valid(flags[flag]):
            raise UserError(f"--{flag} must be {values}, got {flags[flag]}")


def given_flags(make_parser: Callable, argv) -> dict:
    """dest -> value of the flags actually on the command line: `argv` parsed by a fresh parser whose
    defaults are all a marker no command line can produce."""
    parser = make_parser()
    defaults = vars(parser.parse_args([]))
    parser.set_defaults(**dict.fromkeys(defaults, _NOT_GIVEN))
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not _NOT_GIVEN}


def inherit_flags(defaults: dict, given: dict, previous: dict, *, kind: str, checkpoint: str) -> dict:
    """The flags of a run starting from `checkpoint`.

    defaults: every flag's default; given: the flags on the command line; previous: the flags of the run
    that wrote the checkpoint (its Hi LoRA stage and mode included). kind "resume" continues that run at its
    stage, in its folder; kind "hi_lora_retrain" starts the next stage in <checkpoint folder>/hi_lora_stage<k>.
    Given flags win over inherited ones, inherited ones over defaults.
    """
    merged = dict(defaults)
    merged.update({k: v for k, v in previous.items() if k in merged and k not in RUN_ONLY})
    stage = previous.get("hi_lora_stage", 0)
    if kind == "resume":
        merged["hi_lora_stage"] = stage
        fixed = sorted(k for k, v in given.items() if k not in RESUMABLE and v != merged.get(k))
        if fixed:
            raise ValueError(f"--resume continues {checkpoint} as it was started; it cannot change "
                             f"{', '.join('--' + k for k in fixed)} (a resume may change "
                             f"{', '.join('--' + k for k in RESUMABLE[1:])}); start a new run with --retrain instead")
    elif stage >= LAST_STAGE and "hi_lora_stage" not in given:
        raise ValueError(f"{checkpoint} is from the last Hi LoRA stage ({LAST_STAGE}); nothing follows it")
    else:
        check_stage_mode(given, previous, checkpoint)
        merged["hi_lora_stage"] = stage + 1
    merged.update(given)
    if "output_dir" not in given:
        folder = Path(checkpoint).parent
        merged["output_dir"] = str(folder if kind == "resume" else folder / f"hi_lora_stage{merged['hi_lora_stage']}")
    return merged


def check_stage_mode(given: dict, previous: dict, checkpoint: str) -> None:
    """A Hi LoRA stage trains in the mode of the checkpoint it inherits: another --hi_lora_mode or
    --bridge_attention would go on training weights made for one model as another."""
    changed = [k for k in STAGE_MODE if k in given and k in previous and given[k] != previous[k]]
    if changed:
        was = " ".join(f"--{k} {previous[k]}" for k in changed)
        asked = " ".join(f"--{k} {given[k]}" for k in changed)
        flags = " and ".join(f"--{k}" for k in changed)
        raise ValueError(f"--hi_lora_retrain {checkpoint} was trained with {was}, this run gives {asked}; a Hi LoRA "
                         f"stage keeps the mode of the stage it inherits: drop {flags}, or train from stage 0 in the "
                         "new mode (recipe scripts: MODE=official or MODE=paper)")
