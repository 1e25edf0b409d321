"""The checkpoint format of this project, in one place: what train_hivg.py and the converter
(`python -m utils.checkpoint`) write, and how models.weights recognises and reads it back.
utils.checkpoint.save_checkpoint writes the dicts built here (atomically); models.weights.read_weights reads them.

Format 3, a dict of tensors and plain values (it loads with weights_only=True):

    format          3
    model           the HiVG state dict
    config          HiVGConfig.to_dict(): the network, and the only source of its architecture
    args            the flags of the run that wrote it (a dict): provenance, and the flags a resumed run or the
                    next Hi LoRA stage inherits (data, schedule, losses); the network-defining ones come from
                    `config` (inherited_flags)
  training state, in train_hivg.py's checkpoint.pth and best_checkpoint.pth only (what --resume needs):
    optimizer       the AdamW state_dict()
    scheduler       the LR scheduler's state_dict()
    scaler          the fp16 GradScaler's state_dict(), or None
    rng             the random generators' states, one per rank (utils.checkpoint.rng_state)
    epoch           the last epoch trained; -1: the model a Hi LoRA stage inherited, evaluated before its first epoch
    resume_at       (epoch, step) where --resume continues
    best_acc        the best val Acc@0.5 of the run so far
    step_base       the TensorBoard step at which the run began (a stage continues its predecessor's axis)
    stage_end_step  the step at which the next Hi LoRA stage begins
    epoch_losses    only in a run stopped inside an epoch: each rank's loss sums of that epoch so far
Besides train_hivg.py, the recipe scripts read some of them: demo.sh `epoch` and `best_acc`, recipe.sh
`resume_at` and `args["epochs"]`.

Earlier formats keep loading:
    2   no "format" key; the keys above, plus "stage", "hi_lora_mode" and "val_acc" (never read)
    1   (kind "hivg-flags") no "config": the run's flags under "args" and the CLIP under "clip_cfg"; the bridge
        and extraction layers are re-derived from the JSON config its --model names
"""
from typing import Optional, Tuple

from .config import HiVGConfig
from .flags import config_from_flags
from .hivg import HiVG

FORMAT = 3
# What --resume needs beyond the model (a model file, e.g. the converter's, lacks it).
RESUME_STATE = ("optimizer", "scheduler", "rng", "resume_at", "best_acc")
# Config entry -> the flag that sets it (models.config.build_config), for the network-defining flags a resumed run
# or the next stage inherits from the config rather than from the stored flags (an authors' checkpoint stores
# none of hi_lora_mode / bridge_attention: its config gives the official ones).
INHERITED_FROM_CONFIG = {"hi_lora_stage": "hi_lora_stage", "hi_lora_mode": "hi_lora_mode",
                         "bridge_attention": "bridge_attention", "image_size": "imsize",
                         "context_length": "max_query_len", "mixup": "mixup_pretrain"}


def model_file(model: HiVG, run_args: Optional[dict]) -> dict:
    """The checkpoint of a model without training state (the converter's): it evaluates, predicts, and starts
    a run with --retrain or --hi_lora_retrain. `run_args`: the flags of the run that trained it."""
    return {"format": FORMAT, "model": model.state_dict(), "config": model.config.to_dict(),
            "args": dict(run_args or {})}


def training_file(model: HiVG, run_args: dict, *, optimizer: dict, scheduler: dict, scaler: Optional[dict],
                  rng: list, epoch: int, resume_at: Tuple[int, int], best_acc: float, step_base: int,
                  stage_end_step: int, epoch_losses: Optional[list] = None) -> dict:
    """The checkpoint of a training run, from which --resume continues exactly (keys: module docstring;
    optimizer, scheduler and scaler as their state_dict())."""
    contents = dict(model_file(model, run_args), optimizer=optimizer, scheduler=scheduler, scaler=scaler, rng=rng,
                    epoch=epoch, resume_at=resume_at, best_acc=best_acc, step_base=step_base,
                    stage_end_step=stage_end_step)
    if epoch_losses is not None:
        contents["epoch_losses"] = epoch_losses
    return contents


def is_checkpoint(contents) -> bool:
    """Whether a loaded file is a checkpoint of this project, of any format."""
    return isinstance(contents, dict) and ("format" in contents or "config" in contents or
                                           (isinstance(contents.get("args"), dict) and "clip_cfg" in contents))


def format_of(contents: dict) -> int:
    """The format version of a checkpoint of this project (those before format 3 carry none)."""
    return contents.get("format", 2 if "config" in contents else 1)


def read_config(contents: dict, what: str) -> Tuple[str, HiVGConfig]:
    """(kind, config) of a checkpoint of this project: kind "hivg" for formats 2 and 3, "hivg-flags" for format 1.
    A format newer than this code's is a ValueError naming `what` (the flag and path of the file)."""
    version = format_of(contents)
    if not isinstance(version, int) or not 1 <= version <= FORMAT:
        raise ValueError(f"{what} has checkpoint format {version!r}, and this code reads formats 1 to {FORMAT}: "
                         "it was written by a newer version of this project; update the code to read it")
    if version == 1:
        return "hivg-flags", config_from_flags(contents["args"], contents["clip_cfg"])
    return "hivg", HiVGConfig.from_dict(contents["config"])


def check_resumable(contents: dict, what: str) -> None:
    """A ValueError naming `what` (the flag and path of the file) unless the checkpoint holds the training state
    --resume needs (a model file has none)."""
    lacks = [key for key in RESUME_STATE if key not in contents]
    if lacks:
        raise ValueError(f"{what} holds a model but no training state ({', '.join(lacks)} missing), so the run "
                         "cannot continue; start a new run from it with --retrain")


def inherited_flags(run_args: Optional[dict], config: HiVGConfig) -> dict:
    """The flags of the run that wrote a checkpoint, as a resumed run or the next Hi LoRA stage inherits them:
    its stored flags, with the network-defining ones of INHERITED_FROM_CONFIG read from its config."""
    from_config = {flag: getattr(config, entry) for entry, flag in INHERITED_FROM_CONFIG.items()}
    return dict(run_args or {}, **from_config)
