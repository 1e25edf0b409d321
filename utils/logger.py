"""Rank-0 run logging: console, JSON-lines log.txt, TensorBoard scalars and the resolved args."""
import json
import os
import sys
import time
from pathlib import Path


class RunLogger:
    """Every method is a no-op on ranks other than 0 (`enabled` False)."""

    def __init__(self, output_dir: str, enabled: bool, args: dict, purge_step=None):
        """`purge_step`: a resumed run replays the steps from there on; TensorBoard hides the events the
        interrupted run wrote for them, so that no step shows twice."""
        self.enabled = enabled
        self.progress = enabled and sys.stderr.isatty()
        self.dir = Path(output_dir)
        self.writer = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "args.json").write_text(json.dumps(args, indent=2, sort_keys=True) + "\n")
        from torch.utils.tensorboard import SummaryWriter
        if purge_step is not None:
            _wait_to_sort_last(self.dir / "tensorboard")
        self.writer = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge_step)
        self.start = time.time()

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def scalars(self, values: dict, step: int) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def epoch(self, epoch: int, train: dict, val: dict, *, global_step: int) -> None:
        """log.txt record and console line of an epoch; TensorBoard scalars at `global_step`."""
        if not self.enabled:
            return
        head_metrics = val.get("metrics", {})  # those the heads declare (models.heads.HeadSpec.metric)
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in train.items() if k not in ("steps", "interrupted")},
                  "val_acc": val["acc"], "val_miou": val["miou"], **{f"val_{k}": v for k, v in head_metrics.items()},
                  "time_s": round(time.time() - self.start, 1)}
        with open(self.dir / "log.txt", "a") as f:
            f.write(json.dumps(record) + "\n")
        scal = {f"train/{k}": v for k, v in train.items() if k.startswith("loss")}
        scal.update({"train/lr": train["lr"], "train/samples_per_s": train["samples_per_s"],
                     "val/acc": val["acc"], "val/miou": val["miou"]})
        scal.update({f"val/{k}": v for k, v in head_metrics.items()})
        self.scalars(scal, global_step)
        loss = f"{train['loss']:.4f}" if "loss" in train else "n/a (resumed after its last step)"
        self.print(f"epoch {epoch}: loss {loss}  lr {train['lr']:.2e}  "
                   f"{train['samples_per_s']:.1f} samples/s  val Acc@0.5 {val['acc']:.4f}  mIoU {val['miou']:.4f}  "
                   f"[{record['time_s']:.0f}s]")

    def keep_epochs_through(self, epoch: int) -> None:
        """Drop the log.txt records after `epoch`: a run resumed from a checkpoint of `epoch` replays them.
        A line that does not parse is the end of a write a kill cut short, and goes too."""
        path = self.dir / "log.txt"
        if not self.enabled or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines(keepends=True) if _epoch(line) <= epoch]
        tmp = path.with_name(".log.txt.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _wait_to_sort_last(tensorboard_dir: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with the second it was
    made: a resume within the second of the interrupted run's file could sort first, and the purge it
    writes would then hide nothing. Wait (at most a second) until a new file sorts after every other."""
    fields = [p.name.split(".") for p in tensorboard_dir.glob("events.out.tfevents.*")]
    seconds = [int(f[3]) for f in fields if len(f) > 3 and f[3].isdigit()]
    if seconds and max(seconds) >= int(time.time()):   # a clock set back is not waited for
        time.sleep(min(1.0, max(seconds) + 1 - time.time()))


def _epoch(line: str) -> float:
    """The epoch of a log.txt record; infinity for a line that is no record."""
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
