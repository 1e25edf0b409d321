"""The flags of a run that starts from a checkpoint (--resume, --hi_lora_retrain), over plain dicts."""
from pathlib import Path
from typing import Callable

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


def given_flags(make_parser: Callable, argv) -> dict:
    """dest -> value of the flags actually on the command line: `argv` parsed by a fresh parser whose
    defaults are all a marker no command line can produce."""
    parser = make_parser()
    defaults = vars(parser.parse_args([]))
    parser.set_defaults(**dict.fromkeys(defaults, _NOT_GIVEN))
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not _NOT_GIVEN}


def inherit_flags(defaults: dict, given: dict, previous: dict, kind: str, checkpoint: str) -> dict:
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
