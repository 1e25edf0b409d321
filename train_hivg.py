"""Train HiVG: stage 0 and the Hi LoRA stages 1-3, one process or one per rank under torchrun.

    python train_hivg.py --dataset unc --epochs 60 --lr 2.5e-4 --batch_size 80 ... --output_dir out/s0
    python train_hivg.py --hi_lora_retrain out/s0/best_checkpoint.pth --output_dir out/s1 --lr 1e-4 --epochs 20
    torchrun --nproc_per_node 8 train_hivg.py ...          # NCCL on CUDA, gloo on CPU

A Hi LoRA stage takes everything (model, data, mode) from the previous stage's checkpoint; flags given on
the command line override it. `--resume OUT/checkpoint.pth` continues a run exactly, with the network its
checkpoint describes.
"""
import argparse
import random
import signal
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from datasets import add_data_args, build_dataset
from models.checkpoint_format import check_resumable, inherited_flags, training_file
from models.configs import has_warmup_layout, names_pretrained_clip
from models.convert_clip import clip_cfg_from_hf_json
from models.flags import add_model_args
from models.config import HiVGConfig
from models.hivg import HiVG, checked_config
from models.weights import Weights, load_clip, load_previous_stage, load_strict, read_weights
from utils import distributed as du
from utils.checkpoint import refuse_rewinding, rng_state, save_checkpoint, set_rng_state
from utils.engine import (SCHEDULERS, EpochSeeded, LossMeter, NonFiniteLossError, ShardSampler, evaluate, loss_scaler,
                          lr_schedule, make_loader, set_tf32, train_one_epoch)
from utils.errors import UserError, alike_on_every_rank, reports_errors
from utils.flags import add_device_arg, add_hf_clip_config_arg, add_num_workers_arg, add_speed_args
from utils.logger import RunLogger
from utils.losses import build_criterion
from utils.output_dir import claimed
from utils.run_flags import check_ranges, given_flags, inherit_flags
from utils.stop_flag import StopFlag

PROG = "train_hivg.py"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("HiVG training", allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(parser)
    add_model_args(parser, shared=False)
    g = parser.add_argument_group("training")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    g.add_argument("--batch_size", type=int, default=8, help="per rank and micro-batch")
    g.add_argument("--accum_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--epochs", type=int, default=90, help="epochs of this stage")
    g.add_argument("--run_epochs", type=int, default=0, help="stop this run after N epochs (resume later); 0: all")
    g.add_argument("--epoch_samples", type=int, default=0,
                   help="train each epoch on N samples drawn afresh from the split (0: the whole split)")
    g.add_argument("--lr_scheduler", choices=SCHEDULERS, default="step", help="stepped once per epoch")
    g.add_argument("--lr_drop", type=int, default=60, help="step schedule: x0.1 every N epochs")
    g.add_argument("--lr_power", type=float, default=0.9, help="poly schedule exponent")
    g.add_argument("--lr_exponential", type=float, default=0.9, help="exponential schedule factor per epoch")
    g.add_argument("--clip_max_norm", type=float, default=0.0, help="gradient norm clipping (0: none)")
    add_speed_args(g)
    g.add_argument("--sup_type", choices=("full", "unsup"), default="full", help="unsup trains on train_pseudo")
    g.add_argument("--clip_model", default="", help="CLIP weights: open_clip/OpenAI/HF file or the official "
                   "debiased CLIP; without it the CLIP is random")
    g.add_argument("--resume", default="", help="continue a run from its checkpoint.pth")
    g.add_argument("--retrain", default="", help="start from these weights, evaluate them first")
    g.add_argument("--hi_lora_retrain", default="", help="start the next Hi LoRA stage from this checkpoint")
    add_hf_clip_config_arg(g, default="")
    g.add_argument("--hi_lora_clip", default="", help="accepted for the official scripts; not needed")
    g.add_argument("--save_hilora_clip", action="store_true", help="accepted for the official scripts; no effect")
    g.add_argument("--output_dir", default="./outputs", help="checkpoints, log.txt, args.json, tensorboard/; one run "
                   "at a time, and a folder holding an earlier run is refused unless --resume continues it")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --output_dir that holds an earlier "
                   "run: once every input is checked and the model built, delete its checkpoints, log.txt, args.json, "
                   "tensorboard/ and eval.py's results for its checkpoints (eval_checkpoint.json, vis_checkpoint/, "
                   "eval_best_checkpoint.json, vis_best_checkpoint/); refused when the run reads one of them "
                   "(--retrain, --hi_lora_retrain, --clip_model) or when one is a symbolic link")
    add_device_arg(g)
    g.add_argument("--seed", type=int, default=13, help="rank r uses seed + r")
    add_num_workers_arg(g)
    g.add_argument("--eval_batch_size", type=int, default=0, help="default: --batch_size")
    g.add_argument("--print_freq", type=int, default=20,
                   help="a plain progress line every N optimizer steps when the output is not a terminal (0: none); "
                        "also how often the ranks check for a non-finite loss or a stop signal (0: every step)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_ranges(vars(args))
    if not args.output_dir.strip():
        raise UserError("--output_dir is empty; give the folder for this run's checkpoints and log")
    if args.hf_clip_config and not (args.hi_lora_retrain or args.retrain):
        parser.error("--hf_clip_config describes the CLIP of an official checkpoint given to --hi_lora_retrain "
                     "or --retrain; give one of them")
    for flag, why in (("hi_lora_clip", "the next stage's CLIP comes with the --hi_lora_retrain checkpoint"),
                      ("save_hilora_clip", "every checkpoint holds the whole model, CLIP included")):
        if getattr(args, flag):
            print(f"{parser.prog}: warning: --{flag} has no effect here: {why}", file=sys.stderr)
    if args.warmup and not has_warmup_layout(args.model):
        print(f"{parser.prog}: warning: --warmup changes nothing for --model {args.model}: its config has no "
              "warm-up bridge layout (ViT-L/14 runs its warm-up without bridges)", file=sys.stderr)
    if sum(bool(p) for p in (args.resume, args.hi_lora_retrain, args.retrain)) > 1:
        parser.error("--resume, --hi_lora_retrain and --retrain exclude each other (resume continues a run, "
                     "--hi_lora_retrain starts the next stage, --retrain starts from given weights)")


def resolve_args(argv=None):
    """Parse flags and read what a run starts from: (args, Start).

    A resumed run or a new Hi LoRA stage inherits the flags of the run that wrote its checkpoint
    (utils.run_flags.inherit_flags); flags given on the command line win. The network's config is made here,
    once: the resumed checkpoint's, or the flags' (with the CLIP of the checkpoint a new stage starts from).
    """
    parser = get_args_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    check_args(parser, args)
    flag = next((f for f in ("resume", "hi_lora_retrain", "retrain") if getattr(args, f)), None)
    start = None
    if flag:
        clip_cfg = clip_cfg_from_hf_json(args.hf_clip_config) if args.hf_clip_config else None
        start = read_weights(getattr(args, flag), clip_cfg, what=f"--{flag}")
        if not start.is_hivg:
            parser.error(f"--{flag} {start.path} holds CLIP weights ({start.kind}); give it to --clip_model")
        if flag == "resume" and start.checkpoint is None:
            parser.error(f"--resume {start.path} is not a checkpoint of this project (an authors' checkpoint "
                         "starts a run with --retrain or --hi_lora_retrain)")
        if flag == "resume":
            check_resumable(start.checkpoint, f"--resume {start.path}")
    if flag in ("resume", "hi_lora_retrain"):
        previous = inherited_flags(start.run_args, start.config)
        defaults = vars(parser.parse_args([]))
        merged = inherit_flags(defaults, given_flags(get_args_parser, argv), previous, kind=flag,
                               checkpoint=getattr(args, flag))
        args = argparse.Namespace(**merged)
    if flag == "resume":
        refuse_rewinding(start, Path(args.output_dir) / "checkpoint.pth")
    args.eval_batch_size = args.eval_batch_size or args.batch_size
    config = start.config if flag == "resume" else checked_config(args, start.config.clip if start else None)
    clip = read_weights(args.clip_model, what="--clip_model") if args.clip_model and not start else None
    random_clip = not (start or clip) and names_pretrained_clip(args.model)
    notes = [f"WARNING: no --clip_model: training {args.model} on a randomly initialised CLIP"] if random_clip else []
    return args, Start(config, weights=start, clip=clip, notes=notes)


@dataclass
class Start:
    """What a run starts from, read before anything is written: the network's config and its weights."""
    config: HiVGConfig
    weights: Optional[Weights] = None   # --resume / --hi_lora_retrain / --retrain
    clip: Optional[Weights] = None      # --clip_model
    notes: List[str] = field(default_factory=list)   # for the log, once it is open


def build_run_model(start: Start, resume: bool, grad_checkpointing: bool, say) -> HiVG:
    """The network of this run with its starting weights: the resumed checkpoint's exactly, the previous
    stage's (--hi_lora_retrain, --retrain), CLIP weights (--clip_model) or random; `say` prints a line."""
    model = HiVG(start.config, grad_checkpointing=grad_checkpointing)
    weights = start.weights
    if resume:
        load_strict(model, weights.state, f"--resume {weights.path}")
    elif weights:
        fresh = load_previous_stage(model, weights)
        new_bridges = any(k.startswith("bridges.") for k in fresh)
        say(f"loaded {weights.path}; {len(fresh)} fresh tensors (new adapters{', bridges' if new_bridges else ''}) "
            f"for Hi LoRA stage {model.config.hi_lora_stage}")
    elif start.clip:
        load_clip(model, start.clip)
        say(f"loaded CLIP weights from {start.clip.path}")
    return model


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@reports_errors(PROG)
def main(argv=None) -> int:
    with alike_on_every_rank():
        args, start = resolve_args(argv)
        info = du.init_distributed(args.device)
    reads = {flag: getattr(args, flag) for flag in ("resume", "retrain", "hi_lora_retrain", "clip_model",
                                                      "hf_clip_config")}
    stop = StopFlag()
    try:
        with claimed(Path(args.output_dir), args.resume, args.overwrite, reads=reads,
                     is_main=info.is_main) as begin_writing:
            with alike_on_every_rank():
                trainer = Trainer(args, start, info)
            begin_writing()   # a refused run (above) leaves the folder as it was
            trainer.open_log()
            return trainer.fit(stop)
    finally:
        stop.close()
        du.cleanup()


class Trainer:
    """One training run: model, optimizer, data, checkpoints; `fit` runs the epochs."""

    def __init__(self, args, start: Start, info):
        """Builds the model with its starting weights, the data, the optimizer and the criterion: everything
        that checks the inputs, and nothing written yet (`fit` begins writing)."""
        self.args, self.start, self.info, self.device = args, start, info, info.device
        seed_everything(args.seed + info.rank)
        self.notes = list(start.notes)   # printed once the log is open
        self.model = build_run_model(start, bool(args.resume), args.grad_checkpointing, say=self.notes.append)
        self.model.freeze_heads_without_loss()
        self.model.to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.notes.append(f"Hi LoRA stage {self.model.config.hi_lora_stage} ({self.model.config.hi_lora_mode}): "
                          f"{sum(p.numel() for p in params):,} trainable of "
                          f"{sum(p.numel() for p in self.model.parameters()):,} parameters; effective batch "
                          f"{info.world_size} ranks x {args.batch_size} x {args.accum_steps} accum = "
                          f"{info.world_size * args.batch_size * args.accum_steps}")
        train_set = build_dataset("train" if args.sup_type == "full" else "train_pseudo", args)
        self.val_set = build_dataset("val", args)
        set_tf32(self.device, args.tf32)
        schedule = lr_schedule(args.lr_scheduler, epochs=args.epochs, lr_drop=args.lr_drop, lr_power=args.lr_power,
                               lr_exponential=args.lr_exponential)
        self.train_set = EpochSeeded(train_set, args.seed)
        self.micro = args.batch_size * args.accum_steps
        self.sampler = ShardSampler(len(self.train_set), info.rank, info.world_size, shuffle=True, seed=args.seed,
                                    batch_size=self.micro, drop_last=True, epoch_samples=args.epoch_samples)
        if len(self.sampler) == 0:
            raise ValueError(f"the training split has {len(self.train_set)} samples (--epoch_samples "
                             f"{args.epoch_samples}), fewer than one global batch ({info.world_size} x {self.micro}); "
                             "lower --batch_size")
        self.steps_per_epoch = len(self.sampler) // self.micro
        self.scaler = loss_scaler(args.amp, self.device)
        self.criterion = build_criterion(args)
        self.net = self.model
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if args.compile:  # shares the parameters; the checkpoints keep saving self.model
            self.net = torch.compile(self.net)
        self.optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay,
                                           fused=self.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        # TensorBoard's step axis runs on across Hi LoRA stages: a stage starts where the one it inherits ended.
        previous = start.weights.checkpoint if start.weights is not None else None
        self.step_base = (previous or {}).get("step_base" if args.resume else "stage_end_step", 0)
        self.best_acc = -1.0

    def open_log(self) -> None:
        """The run's log in its output folder, with the notes of the set-up. A resumed run writes the steps after
        its checkpoint's again: TensorBoard forgets the events the interrupted run wrote for them."""
        args = self.args
        purge_step = self.global_step(*self.start.weights.checkpoint["resume_at"]) + 1 if args.resume else None
        self.log = RunLogger(args.output_dir, self.info.is_main, vars(args), purge_step=purge_step)
        for note in self.notes:
            self.log.print(note)

    def global_step(self, epoch: int, step: int) -> int:
        """Optimizer steps since the first stage of the recipe, at `step` of `epoch` of this run."""
        return self.step_base + epoch * self.steps_per_epoch + step

    def loader(self, dataset, sampler, batch_size: int, seed: int):
        return make_loader(dataset, sampler, batch_size=batch_size, context_length=self.args.max_query_len,
                           num_workers=self.args.num_workers, device=self.device, seed=seed)

    def validate(self, desc: str) -> dict:
        args = self.args
        return evaluate(self.model, self.val_set,
                        lambda ds, s: self.loader(ds, s, batch_size=args.eval_batch_size, seed=args.seed),
                        device=self.device, rank=self.info.rank, world=self.info.world_size, amp=args.amp,
                        show_progress=self.log.progress, desc=desc)

    def state(self, epoch: int, resume_at, epoch_losses=None) -> dict:
        """Everything a resume needs, and the config that rebuilds the network (models.checkpoint_format)."""
        return training_file(self.model, vars(self.args), optimizer=self.optimizer.state_dict(),
                             scheduler=self.scheduler.state_dict(),
                             scaler=self.scaler.state_dict() if self.scaler else None,
                             rng=du.all_gather_object(rng_state()), epoch=epoch, resume_at=resume_at,
                             best_acc=self.best_acc, step_base=self.step_base,
                             stage_end_step=self.global_step(self.args.epochs, 0), epoch_losses=epoch_losses)

    def save(self, name: str, obj: dict) -> None:
        """Rank 0 writes; every rank raises its error (a full disk), so none waits for it."""
        du.on_main_rank(lambda: save_checkpoint(Path(self.args.output_dir) / name, obj), self.info.is_main)

    def restore(self):
        """(start epoch, start step, LossMeter of that epoch's steps before it): from the resumed checkpoint,
        or (0, 0, empty) after evaluating the inherited weights of a new stage (they are the best so far)."""
        if self.args.resume:
            ckpt = self.start.weights.checkpoint
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
                self.scheduler.load_state_dict(ckpt["scheduler"])
                if self.scaler and ckpt.get("scaler"):
                    self.scaler.load_state_dict(ckpt["scaler"])
                rngs = ckpt["rng"]
                set_rng_state(rngs[self.info.rank] if len(rngs) == self.info.world_size else rngs[0])
            except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:   # written for another model
                raise ValueError(f"--resume {self.args.resume}: its optimizer / scheduler / RNG state does not match "
                                 f"the model of this run ({type(e).__name__}: {e}); start a new run from it with "
                                 "--retrain") from None
            self.best_acc = ckpt["best_acc"]
            self.log.keep_epochs_through(ckpt["epoch"])
            self.log.print(f"resumed {self.args.resume} at epoch {ckpt['resume_at'][0]}, step {ckpt['resume_at'][1]}")
            sums = ckpt.get("epoch_losses") or []   # per rank; on other ranks' counts, rank 0 takes them all
            mine = [sums[self.info.rank]] if len(sums) == self.info.world_size else sums if self.info.is_main else []
            return (*ckpt["resume_at"], LossMeter.from_states(mine, self.device))
        if self.start.weights is not None:
            stats = self.validate("val (inherited)")
            self.best_acc = stats["acc"]
            self.log.print(f"inherited model: val Acc@0.5 {self.best_acc:.4f}, mIoU {stats['miou']:.4f}")
            self.log.scalars({"val/acc": self.best_acc, "val/miou": stats["miou"]}, self.step_base)
            self.save("best_checkpoint.pth", self.state(-1, (0, 0)))
        return 0, 0, LossMeter()

    def fit(self, stop) -> int:
        """Train to --epochs (or --run_epochs more); 0 when done, 1 on a non-finite loss, 128 + signal."""
        try:
            return self.train_epochs(stop)
        except BaseException as e:
            # The traceback's frames hold the DataLoader iterators, whose workers ignore SIGTERM
            # (ignore_stop_signals): kept until exit, multiprocessing's exit handler would wait for them forever.
            # Freed now, they shut their workers down; the traceback keeps its lines.
            traceback.clear_frames(e.__traceback__)
            raise

    def train_epochs(self, stop) -> int:
        args = self.args
        start_epoch, start_step, resumed_losses = self.restore()
        end_epoch = args.epochs if not args.run_epochs else min(args.epochs, start_epoch + args.run_epochs)
        for epoch in range(start_epoch, end_epoch):
            self.sampler.epoch = self.train_set.epoch = epoch
            self.sampler.skip = start_step * self.micro if epoch == start_epoch else 0
            loader = self.loader(self.train_set, self.sampler, batch_size=args.batch_size, seed=args.seed + epoch)
            losses = resumed_losses if epoch == start_epoch else LossMeter()
            try:
                stats = train_one_epoch(self.net, self.criterion, loader, optimizer=self.optimizer, device=self.device,
                                        amp=args.amp, scaler=self.scaler, accum_steps=args.accum_steps,
                                        max_norm=args.clip_max_norm,
                                        start_step=self.sampler.skip // self.micro, stop_requested=stop,
                                        desc=f"stage {self.model.config.hi_lora_stage} epoch {epoch}",
                                        show_progress=self.log.progress, print_freq=args.print_freq, log=self.log.print,
                                        on_check=lambda step, means: self.log.scalars(
                                            {f"train_step/{k}": v for k, v in means.items() if k.startswith("loss")},
                                            self.global_step(epoch, step)),
                                        meter=losses)
            except NonFiniteLossError as e:
                self.log.print(f"{PROG}: error: {e}; stopping: {self.kept_checkpoints()} (lower --lr, or set "
                               "--clip_max_norm)")
                return 1
            if stats["interrupted"]:
                return self.stop_early(epoch, int(stats["steps"]), losses, stop=stop)
            self.scheduler.step()
            val = self.validate(f"val {epoch}")
            self.log.epoch(epoch, stats, val, global_step=self.global_step(epoch + 1, 0))
            is_best = val["acc"] > self.best_acc
            self.best_acc = max(self.best_acc, val["acc"])
            obj = self.state(epoch, (epoch + 1, 0))
            if is_best:  # first: a run killed between the two writes replays this epoch and writes it again
                self.save("best_checkpoint.pth", obj)
            self.save("checkpoint.pth", obj)
            # A stop asked for at the epoch's last step or later: the epoch is validated and saved, as if whole.
            if epoch + 1 < end_epoch and du.any_rank(stop(), self.device):
                return self.stopped(stop, f"after epoch {epoch}")
        self.log.print(f"done: best val Acc@0.5 {self.best_acc:.4f} -> {args.output_dir}/best_checkpoint.pth")
        self.log.close()
        return 0

    def kept_checkpoints(self) -> str:
        """The checkpoints a stopped run leaves, in words."""
        kept = [str(p) for p in (Path(self.args.output_dir) / n for n in ("checkpoint.pth", "best_checkpoint.pth"))
                if p.is_file()]
        return f"the last good checkpoints are kept ({', '.join(kept)})" if kept else "no checkpoint was written yet"

    def stop_early(self, epoch: int, step: int, losses: LossMeter, stop) -> int:
        """Save where a signal stopped the run inside an epoch, with the epoch's loss sums so far, so that
        --resume continues it and logs the epoch's means over all its steps."""
        losses_so_far = du.all_gather_object(losses.state())
        self.save("checkpoint.pth", self.state(epoch - 1, (epoch, step), epoch_losses=losses_so_far))
        return self.stopped(stop, f"at epoch {epoch}, step {step} of {self.steps_per_epoch}")

    def stopped(self, stop, where: str) -> int:
        """128 + the signal that stopped the run, the same on every rank; rank 0 says which and whose."""
        signums = du.all_gather_object(stop.signum)
        rank = next(r for r, s in enumerate(signums) if s)
        signum = signums[rank]
        self.log.print(f"stopped by signal {signum} ({signal.Signals(signum).name}, rank {rank}) {where}: "
                       f"saved {self.args.output_dir}/checkpoint.pth (continue with --resume)")
        self.log.close()
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
