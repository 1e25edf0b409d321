"""Train HiVG: stage 0 and the Hi LoRA stages 1-3, one process or one per rank under torchrun.

    python train_hivg.py --dataset unc --epochs 60 --lr 2.5e-4 --batch_size 80 ... --output_dir out/s0
    python train_hivg.py --hi_lora_retrain out/s0/best_checkpoint.pth --output_dir out/s1 --lr 1e-4 --epochs 20
    torchrun --nproc_per_node 8 train_hivg.py ...          # NCCL on CUDA, gloo on CPU

A Hi LoRA stage takes everything (model config, data, mode) from the previous stage's checkpoint;
flags given on the command line override it. `--resume OUT/checkpoint.pth` continues a run exactly.
"""
import argparse
import math
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from datasets import add_data_args, build_dataset, collate_fn
from models.configs import load_model_config
from models.convert_clip import clip_cfg_from_hf_json
from models.hivg import add_model_args, build_model
from utils import distributed as du
from utils.checkpoint import (load_allowing_fresh_adapters, load_clip_weights, prepare_stage_state,
                              read_any_checkpoint, rng_state, save_checkpoint, set_rng_state)
from utils.engine import EpochSeeded, NonFiniteLossError, ShardSampler, evaluate, loss_scaler, train_one_epoch
from utils.logger import RunLogger
from utils.losses import build_criterion

# Flags that describe one run, never inherited from the checkpoint a stage starts from.
RUN_ONLY = ("output_dir", "resume", "retrain", "hi_lora_retrain", "hi_lora_clip", "clip_model", "hf_clip_config",
            "hi_lora_stage", "run_epochs", "device", "num_workers")
SCHEDULERS = ("cosine", "step", "poly", "halfdecay", "exponential")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("HiVG training", allow_abbrev=False)
    add_data_args(parser)
    add_model_args(parser)
    g = parser.add_argument_group("training")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--batch_size", type=int, default=8, help="per rank and micro-batch")
    g.add_argument("--accum_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--epochs", type=int, default=90)
    g.add_argument("--run_epochs", type=int, default=0, help="stop this run after N epochs (resume later); 0: all")
    g.add_argument("--epoch_samples", type=int, default=0,
                   help="train each epoch on N samples drawn afresh from the split (0: the whole split)")
    g.add_argument("--optimizer", choices=("adamw",), default="adamw")
    g.add_argument("--lr_scheduler", choices=SCHEDULERS, default="step", help="stepped once per epoch")
    g.add_argument("--lr_drop", type=int, default=60)
    g.add_argument("--lr_power", type=float, default=0.9)
    g.add_argument("--lr_exponential", type=float, default=0.9)
    g.add_argument("--clip_max_norm", type=float, default=0.0)
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    g.add_argument("--sup_type", choices=("full", "unsup"), default="full", help="unsup trains on train_pseudo")
    g.add_argument("--clip_model", default="", help="CLIP weights: open_clip/OpenAI/HF file or the official "
                   "debiased CLIP; without it the CLIP is random")
    g.add_argument("--resume", default="", help="continue a run from its checkpoint.pth")
    g.add_argument("--retrain", default="", help="start from these weights, evaluate them first")
    g.add_argument("--hi_lora_retrain", default="", help="start the next Hi LoRA stage from this checkpoint")
    g.add_argument("--hf_clip_config", default="", help="an official checkpoint given to --hi_lora_retrain or "
                   "--retrain whose CLIP is none of the --model configs: its architecture as an HF CLIPConfig JSON")
    g.add_argument("--hi_lora_clip", default="", help="accepted for the official scripts; not needed")
    g.add_argument("--save_hilora_clip", action="store_true", help="accepted for the official scripts; no effect")
    g.add_argument("--output_dir", default="./outputs")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--seed", type=int, default=13, help="rank r uses seed + r")
    g.add_argument("--num_workers", type=int, default=2)
    g.add_argument("--eval_batch_size", type=int, default=0, help="default: --batch_size")
    return parser


def explicit_flags(parser: argparse.ArgumentParser, argv) -> dict:
    """The values of the flags actually given on the command line."""
    quiet = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if isinstance(action, argparse.BooleanOptionalAction):
                quiet.add_argument(*action.option_strings, action=argparse.BooleanOptionalAction, **kwargs)
            elif action.nargs == 0:
                quiet.add_argument(*action.option_strings, action="store_const", const=action.const, **kwargs)
            else:
                quiet.add_argument(*action.option_strings, nargs=action.nargs, type=action.type, **kwargs)
    return vars(quiet.parse_known_args(argv)[0])


def resolve_args(argv=None):
    """Parse flags; a resumed run or a new Hi LoRA stage inherits the checkpoint's flags.

    Returns (args, source) with source = (kind, model args, state, clip_cfg, checkpoint) or None.
    """
    parser = get_args_parser()
    args = parser.parse_args(argv)
    given = explicit_flags(parser, argv if argv is not None else sys.argv[1:])
    source = None
    for kind in ("resume", "hi_lora_retrain"):
        if getattr(args, kind):
            prev_args, state, clip_cfg, ckpt = read_any_checkpoint(getattr(args, kind))
            if kind == "resume" and ckpt is None:
                parser.error(f"--resume {args.resume} is not a checkpoint of this project")
            if ckpt is not None and args.hf_clip_config:
                parser.error(f"{getattr(args, kind)} is a checkpoint of this project and carries its CLIP config; "
                             "drop --hf_clip_config (it is for official checkpoints)")
            merged = vars(args)
            merged.update({k: v for k, v in prev_args.items() if k in merged and k not in RUN_ONLY})
            if kind == "resume":
                merged["hi_lora_stage"] = prev_args["hi_lora_stage"]
            elif "hi_lora_stage" not in given:
                if prev_args.get("hi_lora_stage", 0) >= 3:
                    parser.error(f"{args.hi_lora_retrain} is from the last Hi LoRA stage (3); nothing follows it")
                merged["hi_lora_stage"] = prev_args.get("hi_lora_stage", 0) + 1
            merged.update({k: v for k, v in given.items() if k != "hi_lora_stage" or kind != "resume"})
            if kind == "hi_lora_retrain" and "output_dir" not in given:
                merged["output_dir"] = str(Path(args.hi_lora_retrain).parent / f"hi_lora_stage{args.hi_lora_stage}")
            if kind == "resume" and "output_dir" not in given:  # keep writing where the run was
                merged["output_dir"] = str(Path(args.resume).parent)
            source = (kind, prev_args, state, clip_cfg, ckpt)
            break
    for flag in ("epochs", "batch_size", "accum_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.epoch_samples < 0:
        parser.error(f"--epoch_samples must be 0 (whole split) or positive, got {args.epoch_samples}")
    if args.hf_clip_config and not (args.hi_lora_retrain or args.retrain):
        parser.error("--hf_clip_config describes the CLIP of an official checkpoint given to --hi_lora_retrain "
                     "or --retrain; give one of them")
    if args.resume and args.hi_lora_retrain:
        parser.error("--resume and --hi_lora_retrain exclude each other (resume continues a run, "
                     "--hi_lora_retrain starts the next stage)")
    args.eval_batch_size = args.eval_batch_size or args.batch_size
    return args, source


def lr_lambda(args):
    if args.lr_scheduler == "cosine":
        return lambda e: 0.5 * (1.0 + math.cos(math.pi * e / args.epochs))
    if args.lr_scheduler == "poly":
        return lambda e: (1 - e / args.epochs) ** args.lr_power
    if args.lr_scheduler == "halfdecay":
        return lambda e: 0.5 ** (e // max(args.epochs // 10, 1))
    if args.lr_scheduler == "exponential":
        return lambda e: args.lr_exponential ** e
    return lambda e: 0.1 ** (e // args.lr_drop)


@torch.no_grad()
def init_sincos_position_embedding(clip) -> None:
    """Fixed 2-D sine-cosine table for a random CLIP's vision position embedding (CLS row zero),
    scaled to the patch embedding's output std. open_clip's random init (std ~0.09 at small widths)
    leaves position barely readable from the features, and the box is read from those features."""
    v = clip.visual
    pos = v.positional_embedding
    g, d = math.isqrt(pos.shape[0] - 1), pos.shape[1]
    if g * g != pos.shape[0] - 1 or d % 4:
        raise ValueError("sincos position init needs a square grid and a width divisible by 4")
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float64), torch.arange(g, dtype=torch.float64), indexing="ij")
    parts = [f(c.flatten()[:, None] * omega[None]) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    table = torch.cat(parts, dim=1)
    std = v.conv1.weight.std() * math.sqrt(v.conv1.weight[0].numel())
    pos[0].zero_()
    pos[1:].copy_(table / table.std() * std)


def init_weights(model, args, source) -> None:
    """Weights for a run that does not resume: the previous stage / --retrain / CLIP / random."""
    if args.hi_lora_retrain or args.retrain:
        path = args.hi_lora_retrain or args.retrain
        src_args, state, _, ckpt = source[1:] if args.hi_lora_retrain else read_any_checkpoint(args.retrain)
        state = prepare_stage_state(state, ckpt is None, model, args.hi_lora_mode)
        after_warmup = src_args.get("warmup", False) and not args.warmup
        fresh = load_allowing_fresh_adapters(model, state, f"checkpoint {path}", ("bridges.",) if after_warmup else ())
        print(f"loaded {path}; {len(fresh)} fresh tensors (new adapters{', bridges' if after_warmup else ''}) "
              f"for Hi LoRA stage {args.hi_lora_stage}")
    elif args.clip_model:
        load_clip_weights(model, args.clip_model, args.hi_lora_mode)
        print(f"loaded CLIP weights from {args.clip_model}")
    else:
        cfg = load_model_config(args.model)
        if cfg.get("vision_pos_embed_init") == "sincos":
            init_sincos_position_embedding(model.clip)
        if cfg["name"] not in ("tiny", "demo"):
            print(f"WARNING: no --clip_model: training {args.model} on a randomly initialised CLIP", flush=True)


def freeze_unused_heads(model, args) -> None:
    """Heads without a loss would get no gradient; keeping them out avoids find_unused_parameters."""
    for flag, module in (("use_rtcc_constrain_loss", model.token_align), ("use_mask_loss", model.seg_head)):
        if not getattr(args, flag):
            module.requires_grad_(False)


def ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers leave SIGTERM / SIGINT to the main process, which saves and stops cleanly."""
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


def make_loader(dataset, sampler, batch_size, args, device):
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                      num_workers=args.num_workers, pin_memory=device.type == "cuda",
                      worker_init_fn=ignore_stop_signals)


class StopFlag:
    """SIGTERM / SIGINT ask the training loop to save and stop after the current optimizer step."""

    def __init__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def close(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        self.signum = signum

    def __call__(self) -> bool:
        return self.signum != 0


def main(argv=None) -> int:
    args, source = resolve_args(argv)
    info = du.init_distributed(args.device)
    stop = StopFlag()
    try:
        return train(args, source, info, stop)
    finally:
        stop.close()
        du.cleanup()


def train(args, source, info, stop) -> int:
    device = info.device
    seed = args.seed + info.rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    ckpt = source[4] if source and source[0] == "resume" else None
    clip_cfg = source[3] if source else None
    if clip_cfg is None and args.hf_clip_config:
        clip_cfg = clip_cfg_from_hf_json(args.hf_clip_config)
    model = build_model(argparse.Namespace(**vars(args)), clip_cfg=clip_cfg)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"], strict=True)
    else:
        init_weights(model, args, source)
    freeze_unused_heads(model, args)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    log = RunLogger(args.output_dir, info.is_main, vars(args))
    log.print(f"Hi LoRA stage {args.hi_lora_stage} ({args.hi_lora_mode}): {sum(p.numel() for p in params):,} trainable "
              f"of {sum(p.numel() for p in model.parameters()):,} parameters; effective batch {info.world_size} ranks "
              f"x {args.batch_size} x {args.accum_steps} accum = {info.world_size * args.batch_size * args.accum_steps}")
    net = model
    if info.distributed:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args))
    scaler = loss_scaler(args.amp, device)
    criterion = build_criterion(args)

    train_set = EpochSeeded(build_dataset("train" if args.sup_type == "full" else "train_pseudo", args), args.seed)
    val_set = build_dataset("val", args)
    micro = args.batch_size * args.accum_steps
    sampler = ShardSampler(len(train_set), info.rank, info.world_size, shuffle=True, seed=args.seed, batch_size=micro,
                           drop_last=True, epoch_samples=args.epoch_samples)
    if len(sampler) == 0:
        raise ValueError(f"the training split has {len(train_set)} samples (--epoch_samples {args.epoch_samples}), "
                         f"fewer than one global batch ({info.world_size} x {micro}); lower --batch_size")

    def validate(desc):
        return evaluate(model, val_set, lambda ds, s: make_loader(ds, s, args.eval_batch_size, args, device), device,
                        info.rank, info.world_size, args.amp, log.progress, desc)

    def state(epoch, resume_at, val_acc):
        rngs = du.all_gather_object(rng_state())
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "epoch": epoch, "resume_at": resume_at,
                "stage": args.hi_lora_stage, "hi_lora_mode": args.hi_lora_mode, "args": vars(args),
                "clip_cfg": model.clip_cfg, "rng": rngs, "best_acc": best_acc, "val_acc": val_acc}

    def save(name, obj):
        if info.is_main:
            save_checkpoint(Path(args.output_dir) / name, obj)
        du.barrier()

    best_acc, start_epoch, start_step = -1.0, 0, 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        best_acc, (start_epoch, start_step) = ckpt["best_acc"], ckpt["resume_at"]
        rngs = ckpt["rng"]
        set_rng_state(rngs[info.rank] if len(rngs) == info.world_size else rngs[0])
        log.print(f"resumed {args.resume} at epoch {start_epoch}, step {start_step}")
    elif args.hi_lora_retrain or args.retrain:
        stats = validate("val (inherited)")
        best_acc = stats["acc"]
        log.print(f"inherited model: val Acc@0.5 {best_acc:.4f}, mIoU {stats['miou']:.4f}")
        log.scalars({"val/acc": best_acc, "val/miou": stats["miou"]}, -1)
        save("best_checkpoint.pth", state(-1, (0, 0), best_acc))

    end_epoch = args.epochs if not args.run_epochs else min(args.epochs, start_epoch + args.run_epochs)
    for epoch in range(start_epoch, end_epoch):
        sampler.epoch = train_set.epoch = epoch
        sampler.skip = start_step * micro if epoch == start_epoch else 0
        try:
            stats = train_one_epoch(net, criterion, make_loader(train_set, sampler, args.batch_size, args, device),
                                    optimizer, device, amp=args.amp, scaler=scaler, accum_steps=args.accum_steps,
                                    max_norm=args.clip_max_norm, start_step=sampler.skip // micro,
                                    stop_requested=stop, desc=f"epoch {epoch}", show_progress=log.progress)
        except NonFiniteLossError as e:
            log.print(f"error: {e}; stopping, the last good checkpoint in {args.output_dir} is kept")
            return 1
        if stats["interrupted"] or stop():
            resume_at = (epoch, int(stats["steps"])) if stats["interrupted"] else (epoch + 1, 0)
            if not stats["interrupted"]:
                scheduler.step()
            save("checkpoint.pth", state(epoch - 1 + (not stats["interrupted"]), resume_at, None))
            log.print(f"stopped by signal {stop.signum}: saved {args.output_dir}/checkpoint.pth "
                      f"(continue with --resume)")
            return 128 + stop.signum
        scheduler.step()
        val = validate(f"val {epoch}")
        log.epoch(epoch, stats, val)
        is_best = val["acc"] > best_acc
        best_acc = max(best_acc, val["acc"])
        obj = state(epoch, (epoch + 1, 0), val["acc"])
        save("checkpoint.pth", obj)
        if is_best:
            save("best_checkpoint.pth", obj)
    log.print(f"done: best val Acc@0.5 {best_acc:.4f} -> {args.output_dir}/best_checkpoint.pth")
    log.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
