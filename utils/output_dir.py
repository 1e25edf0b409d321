"""The output folder of a training run: checked before any training, held by one run at a time, and never
mixed with an earlier run's files unless the run continues that run.

Rank 0 holds an exclusive flock on OUTPUT_DIR/.lock for the life of the run. The kernel drops the lock when
the process ends, however it ends, so a killed run leaves no stale lock. A run refused for any reason
(folder, flags, data, weights) leaves the folder's files as they were: --overwrite deletes the earlier run
only once the run has checked all its inputs and is about to write its first file.
"""
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from utils import distributed as du
from utils.checkpoint import check_can_write, leftover_temporaries
from utils.errors import UserError

LOCK = ".lock"
CHECKPOINTS = ("checkpoint.pth", "best_checkpoint.pth")
RUN_FILES = (*CHECKPOINTS, "log.txt")              # an earlier run's results: never replaced unasked
WRITTEN = {**dict.fromkeys((*RUN_FILES, "args.json"), "file"), "tensorboard": "folder"}
# eval.py's results for the checkpoints (eval_<stem>.json, vis_<stem>/), written beside them
EVAL_RESULTS = tuple(f"{kind}_{Path(name).stem}{ext}" for name in CHECKPOINTS
                     for kind, ext in (("eval", ".json"), ("vis", "")))
# what --overwrite deletes, checkpoints last: a failure part way keeps them
DELETED = (*EVAL_RESULTS, "tensorboard", "args.json", "log.txt", *reversed(CHECKPOINTS))
FIX = "give an --output_dir you can write to"


@contextmanager
def claimed(path: Path, resume: str, overwrite: bool, *, reads: dict, is_main: bool):
    """Rank 0 claims `path` (see `claim`) for the with-block, which gets `begin_writing`: call it once the
    run has checked its inputs, before it writes its first file. Every rank raises rank 0's UserError, so
    no rank goes on to wait for the others."""
    fd = du.on_main_rank(lambda: claim(path, resume, overwrite, reads=reads), is_main)
    try:
        yield lambda: du.on_main_rank(lambda: begin_writing(path, resume, overwrite), is_main)
    finally:
        if fd is not None:
            os.close(fd)


def claim(path: Path, resume: str, overwrite: bool, *, reads: dict) -> int:
    """Create `path`, check that a run can write there, lock it: the lock's file descriptor, or a UserError.

    A folder holding an earlier run's RUN_FILES is refused unless `resume` is a checkpoint in it (the run
    continues) or `overwrite` (begin_writing deletes the earlier run). `reads` maps flags to the files the
    run reads: --overwrite never deletes one of them. Nothing but the lock is written here.
    """
    fd = lock(path)
    try:
        check_written_paths(path)
        if replaces_earlier_run(path, resume, overwrite):
            check_not_deleted(path, reads)
    except BaseException:
        os.close(fd)
        raise
    return fd


def begin_writing(path: Path, resume: str, overwrite: bool) -> None:
    """Delete the earlier run that --overwrite replaces, and the temporary files of checkpoint writes
    that a kill interrupted (this run holds the lock: no other process writes them)."""
    if replaces_earlier_run(path, resume, overwrite):
        delete_run(path)
    for tmp in (t for name in CHECKPOINTS for t in leftover_temporaries(path / name)):
        tmp.unlink()


def lock(path: Path) -> int:
    """Create `path` if needed, check that files can be created in it, and take its lock."""
    try:
        check_can_write(path)  # what a checkpoint write needs: a new file in the folder
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except FileExistsError:
        raise UserError(f"--output_dir {path} is a file, not a folder; {FIX}") from None
    except OSError as e:
        if (path / LOCK).is_symlink():   # O_NOFOLLOW: the lock's PID is never written through a link
            raise UserError(symlink_refusal(path, LOCK)) from None
        raise UserError(f"--output_dir {path} cannot be created or written ({e.strerror}); {FIX}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(f"--output_dir {path} is in use by a running training run (process {holder}); wait for "
                        "it to end or give another --output_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def symlink_refusal(path: Path, name: str) -> str:
    link = path / name
    return (f"--output_dir {path}: {link} is a symbolic link (to {os.readlink(link)}); the run writes only inside "
            "its folder: remove the link (what it points to stays) or give another --output_dir")


def check_written_paths(path: Path) -> None:
    """A folder where the run writes a file (or a file where it writes a folder) would fail at save time; a
    symbolic link would have the run write (or --overwrite delete) outside the folder."""
    for name, kind in WRITTEN.items():
        p = path / name
        if p.is_symlink():
            raise UserError(symlink_refusal(path, name))
        if p.exists() and p.is_dir() != (kind == "folder"):
            raise UserError(f"--output_dir {path}: {p} is a {'folder' if p.is_dir() else 'file'} where the run "
                            f"writes its {name} {kind}; move it away or give another --output_dir")


def replaces_earlier_run(path: Path, resume: str, overwrite: bool) -> bool:
    """True when `path` holds an earlier run that --overwrite replaces; a UserError when it holds one that
    the run neither continues (--resume a checkpoint in it) nor replaces."""
    earlier = [name for name in RUN_FILES if (path / name).exists()]
    if not earlier or (resume and Path(resume).resolve().parent == path.resolve()):
        return False
    if overwrite:
        return True
    # a run killed in its first checkpoint write has no checkpoint.pth: advise only a file that exists
    resumable = next((path / name for name in CHECKPOINTS if (path / name).is_file()), None)
    advice = f"continue it with --resume {resumable}, " if resumable else ""
    raise UserError(f"--output_dir {path} holds an earlier run ({', '.join(earlier)}); {advice}give another "
                    "--output_dir, or give --overwrite to delete it and start afresh")


def check_not_deleted(path: Path, reads: dict) -> None:
    """--overwrite never deletes a file the run reads (`reads`: flag -> path): such a run is refused."""
    doomed = [path / name for name in DELETED if (path / name).exists() and not (path / name).is_symlink()]
    for flag, file in ((f, p) for f, p in reads.items() if p):
        read = Path(file).resolve()
        hit = next((d for d in doomed if read == d.resolve() or d.resolve() in read.parents), None)
        if hit:
            raise UserError(f"--{flag} {file} is the earlier run's {hit.name} in --output_dir {path}, which "
                            "--overwrite deletes; copy it out of the folder first, or give another --output_dir")


def delete_run(path: Path) -> None:
    """--overwrite: the earlier run's checkpoints, log, args, TensorBoard events and eval.py's results for its
    checkpoints go, so nothing mixes. A symbolic link is deleted, never what it points to."""
    deleted = [name for name in DELETED if os.path.lexists(path / name)]
    for name in deleted:
        p = path / name
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError as e:
            raise UserError(f"--overwrite: cannot delete {p} ({e.strerror}); delete the earlier run in "
                            f"--output_dir {path} yourself, or give another --output_dir") from None
    print(f"--overwrite: deleted the earlier run's {', '.join(deleted)} in {path}", flush=True)
