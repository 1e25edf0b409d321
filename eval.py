"""Evaluate a HiVG checkpoint: Acc@0.5, mean IoU, accuracy by expression length and the metrics its heads declare
(models.heads.HeadSpec.metric), on one or more splits.

    python eval.py --eval_model OUT/best_checkpoint.pth --eval_set val testA testB
    torchrun --nproc_per_node 8 eval.py --eval_model ... --eval_set test     # exact under any rank count

The checkpoint defines the model (ours, or the authors' converted on load); the data flags default to the
ones of the run that wrote it. Results are added to eval_<checkpoint stem>.json beside the checkpoint (or
in --output_dir), keyed by dataset and split; other entries of that file are kept. That file is checked (readable,
writable) before evaluating and replaced atomically, so an earlier file is never lost.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from datasets import Collate, build_dataset
from datasets.refer import DATA_PATHS, add_data_path_args, add_split_file_args
from datasets.registry import DATASETS, TRAIN_SPLITS, check_dataset_split, dataset_splits
from datasets.synthetic import expression_groups
from models.bridge import BRIDGE_ATTENTION_MODES
from models.convert_clip import clip_cfg_from_hf_json
from models.weights import load_model, read_weights
from utils import distributed as du
from utils.engine import LENGTH_BUCKETS, accuracy_by_group, evaluate, set_tf32
from utils.checkpoint import check_can_write, write_atomically
from utils.errors import UserError, alike_on_every_rank, reports_errors
from utils.flags import add_device_arg, add_hf_clip_config_arg, add_num_workers_arg, add_speed_args
from utils.visualize import save_eval_pictures

PROG = "eval.py"
DEFAULT_DATASET = "referit"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(PROG, description="HiVG evaluation", allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--eval_model", required=True, help="checkpoint to evaluate")
    parser.add_argument("--eval_set", nargs="+", default=["test"],
                        help="one or more splits, or 'all': every evaluation split of each dataset")
    parser.add_argument("--dataset", nargs="+", choices=list(DATASETS),
                        help="one or more datasets (e.g. the five of the paper's table for a mixup model); "
                             "default: the checkpoint's")
    add_data_path_args(parser, fallback="the checkpoint's")
    add_split_file_args(parser)
    parser.add_argument("--bridge_attention", choices=BRIDGE_ATTENTION_MODES,
                        help="default: what the checkpoint was trained with (official for the authors' checkpoints)")
    add_hf_clip_config_arg(parser)
    parser.add_argument("--batch_size", type=int, default=64, help="per rank")
    add_num_workers_arg(parser)
    parser.add_argument("--output_dir", default="", help="where the JSON goes (default: beside the checkpoint)")
    add_device_arg(parser)
    add_speed_args(parser)
    parser.add_argument("--visualize", type=int, default=0, metavar="N",
                        help="save N pictures per split (half hits, half misses): prediction cyan, ground truth green")
    return parser


def format_table(dataset: str, results: dict) -> str:
    cols = ["dataset", "split", "n", "Acc@0.5", "mIoU"] + [f"len {name}" for name, _, _ in LENGTH_BUCKETS]
    rows = [cols]
    for split, r in results.items():
        rows.append([dataset, split, str(r["count"]), f"{100 * r['acc']:.2f}", f"{100 * r['miou']:.2f}"]
                    + [f"{100 * b['acc']:.2f} ({b['count']})" if b["acc"] is not None else "-"
                       for b in r["acc_by_length"].values()])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def data_args(opts, run_args: dict, image_size: int, *, dataset: str,
              use_seg_mask: bool = False) -> argparse.Namespace:
    """What build_dataset reads: the flag if given, else the checkpoint run's value, else the default.
    `use_seg_mask`: the ground-truth masks are the polygons where the split files have them (segmentation head)."""
    values = {k: getattr(opts, k) or run_args.get(k) or default for k, (default, _) in DATA_PATHS.items()}
    return argparse.Namespace(**values, dataset=dataset, imsize=image_size, use_seg_mask=use_seg_mask,
                              allow_unsafe_pickle=opts.allow_unsafe_pickle, allow_outside_paths=opts.allow_outside_paths,
                              aug_scale=False, aug_crop=False, aug_blur=False, aug_translate=False)


def eval_splits(dataset: str, requested, split_root: str = "") -> list:
    """The splits to evaluate: as given, or with 'all' every split of the dataset that is not for training (for a
    JSONL dataset, every file under `split_root` but the training ones)."""
    if list(requested) != ["all"]:
        return list(requested)
    return [s for s in dataset_splits(dataset, split_root) if s not in TRAIN_SPLITS]


def authors_eval_batch(config) -> int:
    """Per-GPU batch of the authors' evaluation scripts for this kind of model (mixup, large, base)."""
    return 64 if config.mixup else 32 if config.name.startswith("ViT-L") else 60


def authors_eval_processes(config) -> int:
    """Processes (one per GPU) of the authors' evaluation scripts: one for mixup base, seven otherwise."""
    return 1 if config.mixup and not config.name.startswith("ViT-L") else 7


def warn_about_batching(config, batch_size: int, world_size: int) -> None:
    """With the official bridge a prediction depends on the other samples of its batch on its rank, so on the batch
    per process and on how many processes share out the samples."""
    batch, processes = authors_eval_batch(config), authors_eval_processes(config)
    if config.bridge_attention == "official" and (batch_size, world_size) != (batch, processes):
        print(f"warning: the official bridge mixes the samples of a batch, so Acc@0.5 depends on the batch per process "
              f"and the number of processes; the authors evaluated this kind of model at --batch_size {batch} per GPU "
              f"on {processes} GPU{'s' if processes > 1 else ''} (base 60 x 7 GPUs, large 32 x 7, mixup base 64 x 1, "
              f"mixup large 64 x 7), this run at {batch_size} on {world_size} process{'es' if world_size > 1 else ''}; "
              f"use theirs (torchrun --nproc_per_node {processes}), or --bridge_attention per_sample",
              file=sys.stderr, flush=True)


def check_counts(parser: argparse.ArgumentParser, opts) -> None:
    for flag, least in (("batch_size", 1), ("num_workers", 0), ("visualize", 0)):
        if getattr(opts, flag) < least:
            parser.error(f"--{flag} must be at least {least}, got {getattr(opts, flag)}")


def read_results(out: Path) -> dict:
    """The results an earlier evaluation wrote to `out` ({} when none), or a UserError that leaves it as it is."""
    if not out.exists():
        return {}
    keep = f"it was left as it is: move it aside (mv {out} {out}.corrupt) or pass another --output_dir"
    try:
        previous = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"results file {out} cannot be read ({e}); {keep}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"results file {out} is not valid JSON ({e}; an earlier write was cut off?); {keep}") from None
    if not isinstance(previous, dict) or not all(isinstance(v, dict) for v in previous.values()):
        raise UserError(f"results file {out} does not hold results keyed by dataset and split; {keep}")
    return previous


def check_results_file(out: Path) -> None:
    """Before evaluating: the earlier results can be read and a new file can be written beside them."""
    fix = "pass --output_dir DIR, a folder you can write to"
    if out.is_dir():
        raise UserError(f"results file {out} is a folder; move it away or {fix}")
    read_results(out)
    try:
        check_can_write(out.parent)
    except OSError as e:
        raise UserError(f"results file {out} cannot be written ({e.strerror or e}); {fix}") from None


def write_results(out: Path, dataset: str, checkpoint: str, *, results: dict) -> None:
    """Merge into out[dataset][split], atomically; entries of other datasets and splits stay."""
    previous = read_results(out)
    entry = previous.setdefault(dataset, {})
    entry.update({split: dict(r, checkpoint=checkpoint) for split, r in results.items()})
    text = json.dumps(previous, indent=2) + "\n"
    try:
        write_atomically(out, lambda f: f.write(text.encode()))
    except OSError as e:
        raise UserError(f"results file {out} cannot be written ({e.strerror or e}); the earlier file is kept; "
                        "pass --output_dir DIR, a folder you can write to") from None


def read_groups(args, split: str) -> list:
    """The synthetic set's expression group of every sample of `split`, read before evaluating."""
    check_dataset_split(args.dataset, split)
    try:
        return expression_groups(args.split_root, split)
    except FileNotFoundError as e:
        raise UserError(f"{e.filename} does not exist: the synthetic set's expression groups of split {split} "
                        f"(--split_root {args.split_root}); regenerate the set with python -m datasets.synthetic "
                        f"--out {args.split_root}") from None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"synthref/synthref_{split}_scenes.json under --split_root {args.split_root} cannot be "
                        f"read ({type(e).__name__}: {e}); regenerate the set with python -m datasets.synthetic "
                        f"--out {args.split_root}") from None


def evaluate_dataset(model, args, splits, *, opts, info, out_dir: Path, net=None) -> dict:
    """Every requested split of one dataset: results by split (and pictures with --visualize).

    `net` runs the evaluation (the compiled model with --compile; default `model`); the pictures use `model`.
    """
    collate, net = Collate(model.context_length), model if net is None else net
    grouped = args.dataset == "synthref"
    groups = {split: read_groups(args, split) for split in splits} if grouped else {}
    results = {}
    for split in splits:
        dataset = build_dataset(split, args)
        loader_fn = lambda ds, s: DataLoader(ds, batch_size=opts.batch_size, sampler=s, collate_fn=collate,
                                             num_workers=opts.num_workers)
        results[split] = evaluate(net, dataset, loader_fn, device=info.device, rank=info.rank, world=info.world_size,
                                  amp=opts.amp, show_progress=info.is_main and sys.stderr.isatty(),
                                  desc=f"eval {args.dataset} {split}", return_ious=opts.visualize > 0 or grouped)
        ious = results[split].pop("ious", None)
        if grouped:
            results[split]["acc_by_group"] = accuracy_by_group(ious, groups[split])
        if info.is_main:
            print(f"{split} Acc@0.5: {results[split]['acc']:.4f}", flush=True)
            for name, value in results[split].get("metrics", {}).items():  # those the heads declare
                print(f"{split} {name}: {value:.4f}", flush=True)
            for group, r in results[split].get("acc_by_group", {}).items():
                print(f"{split} Acc@0.5 {group}: {r['acc']:.4f} ({r['count']} expressions)", flush=True)
        if info.is_main and opts.visualize > 0:
            vis_dir = out_dir / f"vis_{Path(opts.eval_model).stem}"
            paths = save_eval_pictures(model, dataset, ious, n=opts.visualize, out_dir=vis_dir, device=info.device,
                                       prefix=split)
            print(f"{split}: {len(paths)} pictures in {vis_dir}")
    return results


@reports_errors(PROG)
def main(argv=None) -> int:
    parser = get_args_parser()
    opts = parser.parse_args(argv)
    check_counts(parser, opts)
    info = du.init_distributed(opts.device)
    set_tf32(info.device, opts.tf32)
    try:
        with alike_on_every_rank():
            clip_cfg = clip_cfg_from_hf_json(opts.hf_clip_config) if opts.hf_clip_config else None
            weights = read_weights(opts.eval_model, clip_cfg, what="--eval_model")
            model = load_model(weights, info.device, bridge_attention=opts.bridge_attention)
        net = torch.compile(model) if opts.compile else model
        run_args = weights.run_args or {}
        if info.is_main:
            print(f"{opts.eval_model}: {weights.kind} checkpoint, {model.config.name} at Hi LoRA stage "
                  f"{model.config.hi_lora_stage}, bridge attention: {model.config.bridge_attention}", flush=True)
            warn_about_batching(model.config, opts.batch_size, info.world_size)
        out_dir = Path(opts.output_dir) if opts.output_dir else Path(opts.eval_model).parent
        out = out_dir / f"eval_{Path(opts.eval_model).stem}.json"
        du.on_main_rank(lambda: check_results_file(out), info.is_main)
        for name in opts.dataset or [run_args.get("dataset") or DEFAULT_DATASET]:
            args = data_args(opts, run_args, model.image_size, dataset=name, use_seg_mask="seg_map" in model.outputs)
            splits = eval_splits(name, opts.eval_set, args.split_root)
            results = evaluate_dataset(model, args, splits, opts=opts, info=info, out_dir=out_dir, net=net)
            if info.is_main:
                print(format_table(name, results))
                write_results(out, name, str(opts.eval_model), results=results)
                print(f"wrote {out}", flush=True)
        return 0
    finally:
        du.cleanup()


if __name__ == "__main__":
    sys.exit(main())
