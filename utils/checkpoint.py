"""Checkpoint files of this project: atomic writes, RNG states, the guard against a resume that would rewind
its run, and the converter command for the authors' checkpoints. What a checkpoint holds is
models.checkpoint_format's.

    python -m utils.checkpoint OFFICIAL.pth OUT.pth [--hf_clip_config CLIPConfig.json] [--model NAME]

Reading any weights file (ours or foreign) goes through models.weights.read_weights.
"""
import argparse
import errno
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch

from models.checkpoint_format import model_file
from models.convert_clip import clip_cfg_from_hf_json
from models.weights import load_model, read_file, read_weights
from utils.errors import UserError
from utils.flags import add_hf_clip_config_arg

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)   # EFBIG: past the file-size limit (ulimit -f)


def save_checkpoint(path, obj) -> None:
    """torch.save, atomically (`write_atomically`)."""
    write_atomically(path, lambda f: torch.save(obj, f))


def write_atomically(path, write: Callable[[BinaryIO], None]) -> None:
    """`write(f)` to a temporary file in the same folder, fsync, then rename over `path`.

    A crash mid-write leaves the previous file intact: the rename is atomic on POSIX file systems. The file
    gets the mode of any new file under the user's umask (mkstemp's private 0600 would keep a cluster group out).
    A full disk is a UserError naming `path`; the temporary file goes in every case.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = temporary_affixes(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        full = disk_full(e)
        if full:
            kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
            raise UserError(f"no space left writing {path} ({full.strerror}); {kept}; free some space") from e
        raise


def check_can_write(folder) -> None:
    """Create `folder` if needed and write, sync and drop a new file in it, as write_atomically will: an OSError
    (read-only, no permission, full disk) now rather than after the work whose result is to be written."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder) as f:
        f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())


def disk_full(error: BaseException):
    """The OSError of a full disk behind `error`, or None. torch.save reports a failed write of the file
    object as RuntimeError("... unexpected pos ..."), raised while handling the OSError of the write."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return error
        error = error.__cause__ or error.__context__
    return None


def temporary_affixes(path: Path):
    """(prefix, suffix) of the temporary files save_checkpoint writes next to `path`."""
    return f".{path.name}.", ".tmp"


def leftover_temporaries(path) -> list:
    """Temporary files of save_checkpoint(`path`) left behind by a killed process; delete them only while
    no other process may be writing `path`."""
    path = Path(path)
    prefix, suffix = temporary_affixes(path)
    return sorted(path.parent.glob(f"{prefix}*{suffix}"))


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def refuse_rewinding(start, latest: Path) -> None:
    """A resume rewrites its folder's checkpoint.pth and log.txt from its resume point: refuse a resume from
    another file (best_checkpoint.pth, a copy) when `latest` is further on, rather than discard that progress."""
    if not latest.is_file() or latest.resolve() == start.path.resolve():
        return
    try:
        later = tuple(read_file(latest)["resume_at"])
    except (ValueError, KeyError, TypeError):  # damaged or no run's checkpoint: resuming from another file recovers
        return
    at = tuple(start.checkpoint["resume_at"])
    if later > at:
        raise UserError(f"--resume {start.path} would rewind the run: {latest} is further on (epoch {later[0]}, "
                        f"step {later[1]} against epoch {at[0]}, step {at[1]}) and would be overwritten, and "
                        f"log.txt cut; continue with --resume {latest}, or start a new run from {start.path} with "
                        "--retrain and another --output_dir")


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states as plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Convert an official HiVG checkpoint to this project's format.")
    parser.add_argument("official", help="official checkpoint (.pth with 'model' and 'args')")
    parser.add_argument("out", help="output checkpoint path")
    parser.add_argument("--model", help="override the backbone (default: the checkpoint's args.model)")
    add_hf_clip_config_arg(parser)
    opts = parser.parse_args(argv)
    clip_cfg = clip_cfg_from_hf_json(opts.hf_clip_config) if opts.hf_clip_config else None
    weights = read_weights(opts.official, clip_cfg, official_overrides={"model": opts.model})
    if weights.kind != "official-hivg":
        raise ValueError(f"{opts.official} is not an official HiVG checkpoint ({weights.kind})")
    model = load_model(weights, merge=False)
    cfg = model.config
    save_checkpoint(opts.out, model_file(model, weights.run_args))
    print(f"wrote {opts.out}: {cfg.name} at Hi LoRA stage {cfg.hi_lora_stage} ({cfg.hi_lora_mode} mode), "
          f"{len(model.state_dict())} tensors")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
