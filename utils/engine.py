"""Training epoch and exact evaluation, shared by train_hivg.py and eval.py.

Data order and augmentation are functions of (seed, epoch, sample index) only, so a run gives the
same batches whatever the number of ranks or loader workers, and a resumed run picks up exactly
where the interrupted one stopped.
"""
import math
import random
import signal
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.ops import box_convert, box_iou
from tqdm import tqdm

from datasets import Collate
from models.heads import HEADS
from utils import distributed as du

LENGTH_BUCKETS = (("1-5", 1, 5), ("6-7", 6, 7), ("8-10", 8, 10), ("11+", 11, None))


class NonFiniteLossError(RuntimeError):
    pass


class EpochSeeded(Dataset):
    """Seeds Python's `random` (the transforms' only source of randomness) per (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx: int):
        random.seed(f"{self.seed}-{self.epoch}-{idx}")
        return self.dataset[idx]


class ShardSampler(Sampler):
    """Indices for one rank: a permutation seeded by (seed, epoch) (or 0..n-1), rank r taking r::world.

    Training (`drop_last`): the permutation is cut to a multiple of world * batch_size so every rank
    runs the same number of full batches and global batch k holds the same samples for any number of
    ranks. Evaluation: no padding and no cut, each sample lands on exactly one rank.
    `epoch_samples` > 0 keeps the first `epoch_samples` of each epoch's permutation (a fresh subset
    every epoch). `skip` leaves out this rank's first `skip` indices (resuming inside an epoch).
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = False, seed: int = 0,
                 batch_size: int = 1, drop_last: bool = False, epoch_samples: int = 0):
        self.n, self.rank, self.world, self.shuffle, self.seed = n, rank, world, shuffle, seed
        self.batch_size, self.drop_last = batch_size, drop_last
        self.epoch_samples = min(epoch_samples, n) if epoch_samples > 0 else n
        self.epoch, self.skip = 0, 0

    def indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order = order[: self.epoch_samples]
        if self.drop_last:
            order = order[: len(order) // (self.world * self.batch_size) * self.world * self.batch_size]
        return order[self.rank::self.world][self.skip:]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self):
        return len(self.indices())


def ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers leave SIGTERM / SIGINT to the main process, which saves and stops cleanly."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


def make_loader(dataset, sampler, *, batch_size: int, context_length: int, num_workers: int, device: torch.device,
                seed: int) -> DataLoader:
    """A training-run loader whose iterator draws its workers' base seed from its own generator, seeded by `seed`:
    the global generator is left to the model (dropout), so a run resumed inside an epoch draws the same masks."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=Collate(context_length),
                      num_workers=num_workers, pin_memory=device.type == "cuda",
                      worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(seed))


SCHEDULERS = ("cosine", "step", "poly", "halfdecay", "exponential")


def lr_schedule(name: str, *, epochs: int, lr_drop: int, lr_power: float, lr_exponential: float):
    """Learning-rate factor of epoch e, stepped once per epoch: the authors' schedules, by --lr_scheduler."""
    if name == "cosine":
        return lambda e: 0.5 * (1.0 + math.cos(math.pi * e / epochs))
    if name == "poly":
        return lambda e: (1 - e / epochs) ** lr_power
    if name == "halfdecay":
        return lambda e: 0.5 ** (e // max(epochs // 10, 1))
    if name == "exponential":
        return lambda e: lr_exponential ** e
    return lambda e: 0.1 ** (e // lr_drop)


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA, on by default as in timm and open_clip
    (docs/benchmarks.md, "GPU check"); the CPU's settings are left alone. The legacy switches are used
    because they keep torch.get_float32_matmul_precision() readable, which inductor's autotuning reads."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


class LossMeter:
    """Sums of the loss terms over micro-batches, kept on the device: read (one host sync) only at the
    training loop's checks and for the epoch's summary."""

    def __init__(self):
        self.keys, self.sums, self.count = None, None, 0

    def state(self) -> dict:
        """This rank's sums as plain values, for a checkpoint written inside an epoch."""
        return {"keys": self.keys, "sums": None if self.sums is None else self.sums.tolist(), "count": self.count}

    @classmethod
    def from_states(cls, states: List[dict], device: torch.device) -> "LossMeter":
        """A meter holding the sums of `states` added up (one rank's state, or all ranks' on a single rank)."""
        meter = cls()
        for state in (s for s in states if s["sums"] is not None):
            sums = torch.tensor(state["sums"], dtype=torch.float64, device=device)
            meter.keys, meter.sums = state["keys"], sums if meter.sums is None else meter.sums + sums
            meter.count += state["count"]
        return meter

    def add(self, losses: Dict[str, torch.Tensor], total: torch.Tensor) -> None:
        values = torch.stack([v.detach().float() for v in losses.values()] + [total.detach().float()])
        if self.sums is None:
            self.keys, self.sums = list(losses) + ["loss"], values.double()
        else:
            self.sums += values
        self.count += 1

    def means(self, device: torch.device, n_samples: int, stop: bool = False) -> Dict[str, float]:
        """Means over every rank's micro-batches, the number of samples of all ranks ('samples') and whether
        any rank asked to stop ('stop', 1.0 or 0.0): one all-reduce, one host sync.

        Raises NonFiniteLossError when a loss of any rank was not finite since the meter started (a NaN or
        inf stays in the sums).
        """
        sums = self.sums if self.sums is not None else torch.zeros(0, dtype=torch.float64, device=device)
        t = torch.cat([sums, torch.tensor([self.count, n_samples, float(stop)], dtype=torch.float64, device=device)])
        values = du.all_reduce_sum(t).tolist()
        means = dict(zip(self.keys or [], (v / max(values[-3], 1) for v in values[:-3])))
        if not all(math.isfinite(v) for v in means.values()):
            raise NonFiniteLossError(f"non-finite loss (means of this epoch over all ranks: {means})")
        return dict(means, samples=values[-2], stop=float(values[-1] > 0))


def optimizer_step(optimizer, params, scaler, *, max_norm: float) -> None:
    if scaler:
        scaler.unscale_(optimizer)
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(model, criterion, loader, *, optimizer, device: torch.device, amp: str = "none", scaler=None,
                    accum_steps: int = 1, max_norm: float = 0.0, start_step: int = 0,
                    stop_requested: Callable[[], bool] = lambda: False, desc: str = "",
                    show_progress: bool = True, print_freq: int = 0, log: Callable[[str], None] = print,
                    on_check: Optional[Callable[[int, Dict[str, float]], None]] = None,
                    meter: Optional[LossMeter] = None) -> Dict[str, float]:
    """One pass over `loader` (micro-batches), an optimizer step every `accum_steps` micro-batches.

    Returns the mean of each loss term (over ranks), `samples_per_s`, `steps` (optimizer steps done in this
    epoch, counting `start_step`) and `interrupted` (1.0 when `stop_requested` was true on any rank at a check
    before the epoch's last step). `meter` adds up the losses: pass the one holding the sums of the steps before
    `start_step` (resuming inside an epoch) so that the means cover the whole epoch; it is left holding them.

    No host sync per step: the loss sums stay on the device and every rank reads them, with the stop
    requests of all ranks, at a check every `print_freq` optimizer steps (every step with 0) and at the end.
    A check raises NonFiniteLossError when any loss since the epoch began was not finite (the weights in
    memory may then be non-finite too; nothing is saved), or ends the loop right after that optimizer step
    when a stop was requested: every rank stops at the same step. A stop requested at the last step, or
    later, is left to the caller, as the epoch is then complete. Without a progress bar, a check also logs
    one plain line when `print_freq` > 0; `on_check(steps, means)` receives the loss means of every check.
    """
    model.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    meter = LossMeter() if meter is None else meter
    n_samples, steps, interrupted = 0, start_step, False
    start, total_steps = time.time(), start_step + len(loader) // accum_steps
    for i, batch in enumerate(tqdm(loader, desc=desc, disable=not show_progress, dynamic_ncols=True, leave=False)):
        batch = batch.to(device, non_blocking=True)
        last_micro = (i + 1) % accum_steps == 0
        with model.no_sync() if hasattr(model, "no_sync") and not last_micro else nullcontext():
            with autocast(device, amp):
                out = model(batch.images, batch.pixel_mask, batch.ids)
            losses = criterion(out, batch_targets(batch, criterion.targets))
            total = sum(losses.values())
            (scaler.scale(total / accum_steps) if scaler else total / accum_steps).backward()
        meter.add(losses, total)
        n_samples += batch.images.shape[0]
        if not last_micro:
            continue
        optimizer_step(optimizer, params, scaler, max_norm=max_norm)
        steps += 1
        if (steps - start_step) % max(print_freq, 1) == 0:
            means = meter.means(device, n_samples, stop=stop_requested())
            interrupted = means.pop("stop") > 0 and steps < total_steps
            if on_check is not None:
                on_check(steps, means)
            if not show_progress and print_freq > 0:
                log(progress_line(f"{desc} step {steps}/{total_steps}", means, optimizer.param_groups[0]["lr"],
                                  elapsed=time.time() - start,
                                  left_per_done=(total_steps - steps) / (steps - start_step), device=device))
            if interrupted:
                break
    means = meter.means(device, n_samples)  # the end-of-epoch check; a stop request here is left to the caller
    means.pop("stop")
    samples = means.pop("samples")
    means.update(samples_per_s=samples / max(time.time() - start, 1e-9), steps=float(steps),
                 interrupted=float(interrupted), lr=optimizer.param_groups[0]["lr"])
    return means


def progress_line(where: str, means: Dict[str, float], lr: float, *, elapsed: float, left_per_done: float,
                  device: torch.device) -> str:
    """`epoch 3 step 120/500 loss 4.1234 (loss_bbox 0.5000, ...) lr 1.00e-04 52.1 samples/s ETA 7m12s`,
    plus the peak memory on CUDA."""
    samples, loss = means.pop("samples"), means.pop("loss")
    eta = elapsed * left_per_done
    terms = ", ".join(f"{k} {v:.4f}" for k, v in means.items())
    line = (f"{where} loss {loss:.4f} ({terms}) lr {lr:.2e} {samples / max(elapsed, 1e-9):.1f} samples/s "
            f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
    if device.type == "cuda":
        line += f" mem {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GB"
    return line


def length_bucket(phrase: str) -> str:
    n = len(phrase.split(" "))
    for name, lo, hi in LENGTH_BUCKETS:
        if n >= lo and (hi is None or n <= hi):
            return name
    return LENGTH_BUCKETS[0][0]


def batch_targets(batch, keys) -> Dict[str, torch.Tensor]:
    """The fields `keys` of a datasets.collate.Batch, as the targets dict of the criterion and the metrics."""
    return {key: getattr(batch, key) for key in keys}


def head_metrics(out: Dict[str, torch.Tensor], batch, specs) -> List[Dict[str, float]]:
    """Per sample of `batch`, the metrics the heads `specs` declare: [{metric name: value}] of length B."""
    values = {}
    outputs = {key: value.float() for key, value in out.items()}
    for spec in specs:
        per_sample = spec.metric(outputs, batch_targets(batch, spec.targets + spec.metric_targets))
        values.update({name: v.tolist() for name, v in per_sample.items()})
    return [dict(zip(values, sample)) for sample in zip(*values.values())] if values else [{}] * len(batch.texts)


@torch.no_grad()
def evaluate(model, dataset: Dataset, loader_fn: Callable, *, device: torch.device, rank: int = 0, world: int = 1,
             amp: str = "none", show_progress: bool = False, desc: str = "eval",
             return_ious: bool = False) -> Dict[str, object]:
    """Acc@0.5, mean IoU and accuracy by expression length over every sample of `dataset`, once each, and
    under 'metrics' the mean of each metric the model's enabled heads declare (models.heads.HeadSpec.metric), which
    a head's `summary` may turn into other figures (the segmentation head's oIoU: a ratio of sums).

    Rank r evaluates indices r::world (no padding); per-sample values are gathered with their indices
    and every rank returns the same metrics. `loader_fn(dataset, sampler)` builds the DataLoader.
    """
    model.eval()
    specs = [HEADS[name] for name in model.outputs if name in HEADS and HEADS[name].metric is not None]
    sampler = ShardSampler(len(dataset), rank, world)
    order = sampler.indices()
    ious: List[float] = []
    phrases: List[str] = []
    metrics: List[Dict[str, float]] = []
    for batch in tqdm(loader_fn(dataset, sampler), desc=desc, disable=not show_progress, leave=False):
        batch = batch.to(device, non_blocking=True)
        with autocast(device, amp):
            out = model(batch.images, batch.pixel_mask, batch.ids, outputs=["box", *(s.name for s in specs)])
        pred = box_convert(out["pred_box"].float(), "cxcywh", "xyxy").clamp(0, 1)[:, None]  # [B, 1, 4]: sets of one box
        ious += box_iou(pred, box_convert(batch.boxes, "cxcywh", "xyxy")[:, None])[:, 0, 0].nan_to_num(0.0).tolist()
        phrases += batch.texts
        metrics += head_metrics(out, batch, specs)
    if len(ious) != len(order):
        raise RuntimeError(f"rank {rank} evaluated {len(ious)} samples, expected {len(order)}")
    gathered = du.all_gather_object(list(zip(order, ious, phrases, metrics)))
    rows = sorted((r for part in gathered for r in part), key=lambda r: r[0])
    if [r[0] for r in rows] != list(range(len(dataset))):
        raise RuntimeError("distributed evaluation did not cover every sample exactly once")
    summary = summarize([r[1] for r in rows], [r[2] for r in rows])
    if specs:  # means in dataset order, so the same for any number of ranks
        names = rows[0][3] if rows else {}
        summary["metrics"] = {name: sum(r[3][name] for r in rows) / len(rows) for name in names}
        for spec in (s for s in specs if s.summary is not None):
            summary["metrics"] = spec.summary(summary["metrics"])
    if return_ious:  # per-sample IoUs in dataset order
        summary["ious"] = [r[1] for r in rows]
    return summary


def summarize(ious: List[float], phrases: List[str]) -> Dict[str, object]:
    n = len(ious)
    hits = [iou >= 0.5 for iou in ious]
    by_len = {}
    for name, _, _ in LENGTH_BUCKETS:
        sel = [h for h, p in zip(hits, phrases) if length_bucket(p) == name]
        by_len[name] = {"count": len(sel), "acc": sum(sel) / len(sel) if sel else None}
    return {"count": n, "acc": sum(hits) / max(n, 1), "miou": sum(ious) / max(n, 1), "acc_by_length": by_len}


def accuracy_by_group(ious: List[float], groups: List[str]) -> Dict[str, Dict[str, float]]:
    """Acc@0.5 and count of each group (in sorted order), sample i being in group groups[i]."""
    if len(ious) != len(groups):
        raise ValueError(f"{len(ious)} IoUs for {len(groups)} group labels")
    out = {}
    for g in sorted(set(groups)):
        sel = [iou >= 0.5 for iou, label in zip(ious, groups) if label == g]
        out[g] = {"count": len(sel), "acc": sum(sel) / len(sel)}
    return out


def loss_scaler(amp: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    if amp != "fp16":
        return None
    if device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA (its gradient scaler); use --amp bf16 on CPU")
    return torch.amp.GradScaler("cuda")
