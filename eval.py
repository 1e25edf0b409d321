"""Evaluate a HiVG checkpoint (ours, or the authors' converted on load) on one or more splits.

    python eval.py --eval_model OUT/best_checkpoint.pth --eval_set val testA testB
    torchrun --nproc_per_node 4 eval.py --eval_model ... --eval_set test      # exact for any rank count

Reports Acc@0.5, mean IoU and accuracy by expression length; writes eval_<checkpoint>.json beside
the checkpoint (or in --output_dir). The checkpoint defines the model; data flags given here
override its data paths. Model flags of the official eval command lines are accepted and ignored.
"""
import argparse
import json
import sys
from pathlib import Path

from torch.utils.data import DataLoader

from datasets import add_data_args, build_dataset, collate_fn
from models.hivg import add_model_args
from utils import distributed as du
from utils.checkpoint import load_model
from utils.engine import LENGTH_BUCKETS, evaluate
from utils.visualize import save_eval_pictures

DATA_FLAGS = ("dataset", "data_root", "split_root", "use_seg_mask", "allow_unsafe_pickle")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("HiVG evaluation", allow_abbrev=False)
    add_data_args(parser)
    add_model_args(parser)
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval_model", required=True, help="checkpoint to evaluate")
    g.add_argument("--eval_set", nargs="+", default=["test"], help="one or more splits")
    g.add_argument("--batch_size", type=int, default=64, help="per rank")
    g.add_argument("--num_workers", type=int, default=2)
    g.add_argument("--output_dir", default="", help="where the JSON goes (default: beside the checkpoint)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    g.add_argument("--visualize", type=int, default=0, metavar="N",
                   help="save N pictures per split (half hits, half misses): prediction cyan, ground truth green")
    for flag in ("--save_hilora_clip",):
        g.add_argument(flag, action="store_true", help="accepted for the official scripts; no effect")
    g.add_argument("--sup_type", default="full", help="accepted for the official scripts; no effect")
    return parser


def format_table(results: dict) -> str:
    cols = ["split", "n", "Acc@0.5", "mIoU"] + [f"len {name}" for name, _, _ in LENGTH_BUCKETS]
    rows = [cols]
    for split, r in results.items():
        rows.append([split, str(r["count"]), f"{100 * r['acc']:.2f}", f"{100 * r['miou']:.2f}"]
                    + [f"{100 * b['acc']:.2f} ({b['count']})" if b["acc"] is not None else "-"
                       for b in r["acc_by_length"].values()])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def main(argv=None) -> int:
    parser = get_args_parser()
    argv = sys.argv[1:] if argv is None else argv
    opts = parser.parse_args(argv)
    given = {a.dest for a in parser._actions if any(s in argv or any(x.startswith(s + "=") for x in argv)
                                                    for s in a.option_strings)}
    info = du.init_distributed(opts.device)
    try:
        model, model_args = load_model(opts.eval_model)
        args = argparse.Namespace(**model_args)
        for key in DATA_FLAGS:
            if key in given or not hasattr(args, key):
                setattr(args, key, getattr(opts, key))
        for key in ("aug_scale", "aug_crop", "aug_blur", "aug_translate"):
            setattr(args, key, False)
        model.to(info.device)
        out_dir = Path(opts.output_dir) if opts.output_dir else Path(opts.eval_model).parent
        results = {}
        for split in opts.eval_set:
            dataset = build_dataset(split, args)
            loader_fn = lambda ds, s: DataLoader(ds, batch_size=opts.batch_size, sampler=s, collate_fn=collate_fn,
                                                 num_workers=opts.num_workers)
            results[split] = evaluate(model, dataset, loader_fn, info.device, info.rank, info.world_size, opts.amp,
                                      info.is_main and sys.stderr.isatty(), f"eval {split}",
                                      return_ious=opts.visualize > 0)
            if info.is_main:
                print(f"{split} Acc@0.5: {results[split]['acc']:.4f}", flush=True)
            if info.is_main and opts.visualize > 0:
                vis_dir = out_dir / f"vis_{Path(opts.eval_model).stem}"
                paths = save_eval_pictures(model, dataset, results[split].pop("ious"), opts.visualize, vis_dir,
                                           info.device, prefix=split)
                print(f"{split}: {len(paths)} pictures in {vis_dir}")
        if info.is_main:
            print(format_table(results))
            out = out_dir / f"eval_{Path(opts.eval_model).stem}.json"
            previous = json.loads(out.read_text()) if out.is_file() else {}
            previous.update({s: dict(r, dataset=args.dataset, checkpoint=str(opts.eval_model)) for s, r in results.items()})
            out_dir.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(previous, indent=2) + "\n")
            print(f"wrote {out}")
        return 0
    finally:
        du.cleanup()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
