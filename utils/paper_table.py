"""Our Acc@0.5 beside the paper's (HiVG, ACM MM 2024, main table), from eval.py result files.

    python -m utils.paper_table --row HiVG-B outputs/*/eval_best_checkpoint.json

Each file is what eval.py writes ({dataset: {split: {"acc": ...}}}); later files win for the same dataset and
split. Prints a markdown table: one column per dataset split of the paper's table, rows ours / paper / difference
(percentage points). A split we have no result for shows "-". Results of other datasets and splits (a JSONL
dataset of one's own, RefCOCO testA of a mixup model's other runs, ...) follow in a table of their own; the paper's
table is left out when none of its splits has a result.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

COLUMNS: List[Tuple[str, str, str]] = [  # (dataset, split, header)
    ("unc", "val", "RefCOCO val"), ("unc", "testA", "RefCOCO testA"), ("unc", "testB", "RefCOCO testB"),
    ("unc+", "val", "RefCOCO+ val"), ("unc+", "testA", "RefCOCO+ testA"), ("unc+", "testB", "RefCOCO+ testB"),
    ("gref_umd", "val", "RefCOCOg val"), ("gref_umd", "test", "RefCOCOg test"),
    ("referit", "test", "ReferIt test"), ("flickr", "test", "Flickr30k test"),
]
# Acc@0.5 (%) of the paper's main table, in COLUMNS order.
PAPER = {
    "HiVG-B": (87.32, 89.86, 83.27, 78.06, 83.81, 68.11, 78.29, 78.79, 75.22, 82.11),
    "HiVG-L": (88.14, 91.09, 83.71, 80.10, 86.77, 70.53, 80.78, 80.25, 76.23, 82.16),
    "HiVG-B mixup": (90.56, 92.55, 87.23, 83.08, 89.21, 76.68, 84.52, 85.62, 77.75, 82.08),
    "HiVG-L mixup": (90.77, 92.94, 88.03, 86.78, 89.91, 78.02, 86.61, 86.60, 78.16, 82.63),
}


def read_results(paths) -> Dict[Tuple[str, str], float]:
    """(dataset, split) -> Acc@0.5 in percent, from eval.py JSON files."""
    found = {}
    for path in paths:
        try:
            content = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is not an eval.py result file ({e})") from None
        for dataset, splits in content.items():
            if not isinstance(splits, dict) or not all(isinstance(r, dict) and "acc" in r for r in splits.values()):
                raise ValueError(f"{path}: entry {dataset!r} is not {{split: {{'acc': ...}}}} (a file written by an "
                                 "older eval.py is keyed by split only: evaluate again)")
            found.update({(dataset, split): 100 * r["acc"] for split, r in splits.items()})
    return found


def table(row: str, ours: Dict[Tuple[str, str], float]) -> str:
    paper = PAPER[row]
    header = "| | " + " | ".join(h for _, _, h in COLUMNS) + " |"
    rule = "|---" * (len(COLUMNS) + 1) + "|"
    got = [ours.get((d, s)) for d, s, _ in COLUMNS]
    lines = [header, rule,
             "| ours | " + " | ".join("-" if v is None else f"{v:.2f}" for v in got) + " |",
             f"| paper ({row}) | " + " | ".join(f"{p:.2f}" for p in paper) + " |",
             "| difference | " + " | ".join("-" if v is None else f"{v - p:+.2f}" for v, p in zip(got, paper)) + " |"]
    return "\n".join(lines)


def other_results(ours: Dict[Tuple[str, str], float]) -> str:
    """A markdown table of the results outside the paper's columns, '' when there are none."""
    paper = {(d, s) for d, s, _ in COLUMNS}
    rows = [f"| {d} | {s} | {acc:.2f} |" for (d, s), acc in ours.items() if (d, s) not in paper]
    return "\n".join(["| dataset | split | Acc@0.5 |", "|---|---|---|", *rows]) if rows else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("results", nargs="+", help="eval.py result files (eval_<checkpoint>.json)")
    parser.add_argument("--row", choices=list(PAPER), default="HiVG-B", help="the paper's row to compare with")
    opts = parser.parse_args(argv)
    ours = read_results(opts.results)
    others = other_results(ours)
    in_paper = any((d, s) in ours for d, s, _ in COLUMNS)
    print("\n\n".join(t for t in (table(opts.row, ours) if in_paper or not others else "", others) if t))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        sys.exit(f"error: {e}")
