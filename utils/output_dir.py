"""The output folder of a training run: checked before any training, held by one run at a time, and never
mixed with an earlier run's files unless the run continues that run.

Rank 0 holds an exclusive flock on OUTPUT_DIR/.lock for the life of the run. The kernel drops the lock when
the process ends, however it ends, so a killed run leaves no stale lock.
"""
import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from utils import distributed as du
from utils.checkpoint import leftover_temporaries
from utils.errors import UserError

LOCK = ".lock"
CHECKPOINTS = ("checkpoint.pth", "best_checkpoint.pth")
RUN_FILES = (*CHECKPOINTS, "log.txt")              # an earlier run's results: never replaced unasked
WRITTEN = {**dict.fromkeys((*RUN_FILES, "args.json"), "file"), "tensorboard": "folder"}
FIX = "give an --output_dir you can write to"


@contextmanager
def claimed(path: Path, resume: str, overwrite: bool, is_main: bool):
    """Rank 0 claims `path` (see `claim`) for the with-block; every rank raises rank 0's UserError when it
    cannot, so no rank goes on to wait for the others."""
    fd, error = None, None
    if is_main:
        try:
            fd = claim(path, resume, overwrite)
        except UserError as e:
            error = str(e)
    error = du.all_gather_object(error)[0]
    if error:
        raise UserError(error)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def claim(path: Path, resume: str, overwrite: bool) -> int:
    """Create `path`, check that a run can write there, lock it: the lock's file descriptor, or a UserError.

    A folder holding an earlier run's RUN_FILES is refused unless `resume` is a checkpoint in it (the run
    continues) or `overwrite` (the earlier run's files are deleted first). Temporary files of checkpoint
    writes that a kill interrupted are deleted.
    """
    fd = lock(path)
    try:
        check_written_paths(path)
        earlier = [name for name in RUN_FILES if (path / name).exists()]
        if earlier and not (resume and Path(resume).resolve().parent == path.resolve()):
            if not overwrite:
                raise UserError(f"--output_dir {path} holds an earlier run ({', '.join(earlier)}); continue it with "
                                f"--resume {path / 'checkpoint.pth'}, give another --output_dir, or give "
                                "--overwrite to delete it and start afresh")
            delete_run(path)
        for tmp in (t for name in CHECKPOINTS for t in leftover_temporaries(path / name)):
            tmp.unlink()
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock(path: Path) -> int:
    """Create `path` if needed, check that files can be created in it, and take its lock."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()  # what a checkpoint write needs: a new file in the folder
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except FileExistsError:
        raise UserError(f"--output_dir {path} is a file, not a folder; {FIX}") from None
    except OSError as e:
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


def check_written_paths(path: Path) -> None:
    """A folder where the run writes a file (or a file where it writes a folder) would fail at save time."""
    for name, kind in WRITTEN.items():
        p = path / name
        if p.exists() and p.is_dir() != (kind == "folder"):
            raise UserError(f"--output_dir {path}: {p} is a {'folder' if p.is_dir() else 'file'} where the run "
                            f"writes its {name} {kind}; move it away or give another --output_dir")


def delete_run(path: Path) -> None:
    """--overwrite: the earlier run's checkpoints, log, args and TensorBoard events go, so nothing mixes."""
    deleted = [name for name in WRITTEN if (path / name).exists()]
    for name in deleted:
        if WRITTEN[name] == "folder":
            shutil.rmtree(path / name)
        else:
            (path / name).unlink()
    print(f"--overwrite: deleted the earlier run's {', '.join(deleted)} in {path}", flush=True)
