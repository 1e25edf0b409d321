"""Check a dataset on disk before training on it.

    python -m datasets.verify --dataset D --data_root R --split_root S [--split X] [--dump N]

It fails wherever training would refuse to start or stop: a --data_root or --split_root that is
not a folder, a missing val split or training split (train or train_pseudo; without --split), an
unreadable split file or entry (an image path leading outside its image folder included, unless
--allow_outside_paths), a missing image folder. Every image of the splits is opened and decoded;
each missing or unreadable image, and each image whose size differs from any of its split-file
entries, is listed. Then, per split: the number of samples and images, zero-area boxes (after
the integer truncation; skipped in training, see :mod:`datasets.refer`), phrases longer than the
77-token CLIP context (truncated by the tokenizer), empty expressions (kept, listed with their
split file and entries), and boxes partly outside their image (clipped to it) or wholly outside
it (an error, with the split file and sample numbers). For ``mixup``, no image of its train split
may appear in an evaluation split of unc, unc+, gref, gref_umd, referit, flickr or mixup itself
(the split files found under --split_root are checked). For a JSONL dataset (--data_root its images,
--split_root its <split>.jsonl files) every bad line is listed as ``file:line: problem; fix``, each line's
image opened. The exit status is 1 when any of these errors is found, 2 for bad flags, else 0.

``--dump N`` prints the first N samples of the split (default ``val``) after the eval
transform as JSON lines on stdout: ``image``, ``phrase``, ``box_xyxy`` (pixels of the
padded imsize x imsize frame) and ``imsize``; the report then goes to stderr.
"""
import argparse
import json
import os
import sys

from PIL import Image
from tqdm import tqdm

from .errors import reports_errors
from .refer import (GroundingDataset, add_data_path_args, add_split_file_args, blank_phrases, is_degenerate, listed,
                    load_refs, outside, read_split, split_files, split_problems)
from .registry import DATASETS, IMAGE_DIRS, dataset_splits
from .tokens import CONTEXT_LENGTH, is_truncated
from .transforms import make_transforms

EVAL_SPLITS = ("val", "test", "testA", "testB")
LEAK_DATASETS = ("unc", "unc+", "gref", "gref_umd", "referit", "flickr", "mixup")
# A training run reads one of these (train_pseudo with --sup_type unsup), and val.
TRAINING_SPLITS = ("train", "train_pseudo")
FOLDERS = {"--data_root": "the folder that holds the image folders (other/, referit/, Flickr30k/, synthref/)",
           "--split_root": "the folder that holds <dataset>/<dataset>_<split>.pth"}


def check_image(path: str, sizes_hw=()):
    """(size (h, w) or None, reason or None): no reason when the image decodes (at reduced size for JPEGs)
    and has each size in ``sizes_hw`` (those its split-file entries give; training checks every entry)."""
    if not os.path.isfile(path):
        return None, "missing"
    size = None
    try:
        with Image.open(path) as img:
            size = (img.height, img.width)
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure makes the image unreadable
        return size, f"unreadable ({type(e).__name__}: {e})"
    wrong = sorted(f"{w}x{h}" for h, w in set(sizes_hw) - {size})
    if wrong:
        return size, f"size {size[1]}x{size[0]} differs from the split file's {' and '.join(wrong)}"
    return size, None


def image_problems(data_root: str, refs):
    """([(path, reason)] for every distinct image of ``refs`` that is missing, unreadable or mis-sized, and
    for every missing image folder (its images are not listed), {(folder, image): (h, w)} for those whose
    header could be read)."""
    images = {}
    for r in refs:
        expected = images.setdefault((r.folder, r.image), set())
        if r.size_hw is not None:
            expected.add(r.size_hw)
    problems, sizes = [], {}
    folders = {folder for folder, _ in images}
    for folder in sorted(folders):
        root = os.path.join(data_root, IMAGE_DIRS[folder])
        if not os.path.isdir(root):     # as training refuses it (datasets.refer.build_dataset)
            problems.append((root, f"image folder not found; set --data_root to the folder that contains "
                                   f"{IMAGE_DIRS[folder]}"))
            folders.discard(folder)
    present = sorted((key, expected) for key, expected in images.items() if key[0] in folders)
    for (folder, image), expected in tqdm(present, desc="images", disable=None, file=sys.stderr):
        path = os.path.join(data_root, IMAGE_DIRS[folder], image)
        size, reason = check_image(path, expected)
        if size:
            sizes[folder, image] = size
        if reason:
            problems.append((path, reason))
    return problems, sizes


def leaks(split_root: str, train_refs, allow_unsafe: bool = False, allow_outside: bool = False) -> dict:
    """{'dataset split': sorted shared images} for evaluation splits that share images with ``train_refs``."""
    train_images = {(r.folder, r.image) for r in train_refs}
    found = {}
    for dataset in LEAK_DATASETS:
        for split in EVAL_SPLITS:
            files = split_files(split_root, dataset, split)
            if split not in DATASETS[dataset].splits or not all(map(os.path.isfile, files)):
                continue
            refs = load_refs(split_root, dataset, split, allow_unsafe=allow_unsafe, allow_outside=allow_outside)
            shared = train_images & {(r.folder, r.image) for r in refs}
            if shared:
                found[f"{dataset} {split}"] = sorted(f"{IMAGE_DIRS[f]}/{i}" for f, i in shared)
    return found


def dump(data_root: str, refs, imsize: int, n: int) -> None:
    """Print the first n samples after the eval transform as JSON lines."""
    dataset = GroundingDataset(refs[:n], data_root, make_transforms(imsize, train=False))
    for record in dataset:
        cx, cy, w, h = (record.box * imsize).tolist()
        print(json.dumps({"image": record.image_file, "phrase": record.phrase,
                          "box_xyxy": [round(v, 2) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)],
                          "imsize": imsize}))


def report_split(split: str, refs, sizes: dict, log) -> bool:
    """Print a split's counts; True when it is empty or has a box wholly outside its image."""
    long_phrases = sum(is_truncated(r.phrase, CONTEXT_LENGTH) for r in refs)
    kinds = [outside(r, sizes.get((r.folder, r.image))) for r in refs]
    blank = blank_phrases(refs)
    print(f"{split}: {len(refs)} samples, {len({(r.folder, r.image) for r in refs})} images, "
          f"{sum(map(is_degenerate, refs))} zero-area boxes, {long_phrases} phrases over {CONTEXT_LENGTH} tokens, "
          f"{kinds.count('partly')} boxes partly outside the image (clipped), {kinds.count('wholly')} wholly "
          f"outside, {sum(map(len, blank.values()))} empty expressions", file=log)
    for source in dict.fromkeys(r.source for r, kind in zip(refs, kinds) if kind == "wholly"):
        at = [i for i, (r, kind) in enumerate(zip(refs, kinds)) if kind == "wholly" and r.source == source]
        print(f"{split}: ERROR {len(at)} boxes lie wholly outside their image in {source} (samples {listed(at)}); "
              "fix the split file or the images", file=log)
    for source, entries in blank.items():
        print(f"{split}: warning: {len(entries)} empty expressions in {source} (entries {listed(entries)}); "
              "training and evaluation keep them, as the official loader does", file=log)
    if not refs:
        print(f"{split}: ERROR the split is empty", file=log)
    return not refs or "wholly" in kinds


def load_splits(args, log) -> tuple:
    """({split: refs} of the splits to check that could be read, whether a needed one is missing or unreadable):
    --split alone, else every split of the dataset but trainval whose files exist; val and a training split
    must. Every entry that cannot be read is listed, and every problem of the dataset's own checks (a JSONL
    dataset's: datasets.formats.jsonl.problems)."""
    splits = [args.split] if args.split else [s for s in dataset_splits(args.dataset, args.split_root)
                                              if s != "trainval"]
    failed, loaded = False, {}
    for split in splits:
        files = split_files(args.split_root, args.dataset, split)
        if not args.split and not all(map(os.path.isfile, files)):
            needed = split == "val"
            print(f"{split}: {'ERROR ' if needed else ''}no split file ({', '.join(files)})"
                  f"{'; training validates on it' if needed else ''}", file=log)
            failed |= needed
            continue
        try:
            loaded[split], bad = read_split(args.split_root, args.dataset, split, allow_unsafe=args.allow_unsafe_pickle,
                                            allow_outside=args.allow_outside_paths)
        except (FileNotFoundError, ValueError) as e:
            print(f"{split}: ERROR {e}", file=log)
            failed = True
            continue
        bad += split_problems(loaded[split], args.dataset, args.data_root)
        for problem in bad:
            print(f"{split}: ERROR {problem}", file=log)
        failed |= bool(bad)
    trains = [s for s in TRAINING_SPLITS if s in DATASETS[args.dataset].splits]
    if not args.split and not any(os.path.isfile(path) for s in trains
                                  for path in split_files(args.split_root, args.dataset, s)):
        print(f"ERROR no training split ({' or '.join(trains)}) under --split_root {args.split_root}", file=log)
        failed = True
    return loaded, failed


@reports_errors("datasets.verify")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Verify split files and images of a grounding dataset.")
    parser.add_argument("--dataset", required=True, choices=list(DATASETS))
    add_data_path_args(parser, required=True)
    parser.add_argument("--split", help="check only this split (default: every split file present)")
    parser.add_argument("--dump", type=int, default=0, metavar="N", help="print N eval-transformed samples")
    parser.add_argument("--imsize", type=int, default=224, help="input side for --dump")
    add_split_file_args(parser)
    args = parser.parse_args(argv)
    log = sys.stderr if args.dump else sys.stdout
    not_folders = [(flag, path) for flag, path in zip(FOLDERS, (args.data_root, args.split_root))
                   if not os.path.isdir(path)]
    for flag, path in not_folders:
        print(f"ERROR {flag} {path} is not a folder; set it to {FOLDERS[flag]}", file=log)
    if not_folders:
        print("FAILED", file=log)
        return 1

    loaded, failed = load_splits(args, log)
    problems, sizes = image_problems(args.data_root, [r for refs in loaded.values() for r in refs])
    for split, refs in loaded.items():
        failed |= report_split(split, refs, sizes=sizes, log=log)
    for path, reason in problems:
        print(f"image {path}: {reason}", file=log)
    print(f"images: {len(problems)} problems", file=log)
    failed |= bool(problems)

    if args.dataset == "mixup" and "train" in loaded:
        found = leaks(args.split_root, loaded["train"], allow_unsafe=args.allow_unsafe_pickle,
                      allow_outside=args.allow_outside_paths)
        for where, images in found.items():
            print(f"leak: {len(images)} mixup train images appear in {where}, e.g. {', '.join(images[:5])}",
                  file=log)
        print(f"leakage: {'FOUND' if found else 'none'}", file=log)
        failed |= bool(found)

    if args.dump:
        split = args.split or next((s for s in EVAL_SPLITS if s in loaded), next(iter(loaded), None))
        bad = {p for p, _ in problems}
        usable = [r for r in loaded.get(split, [])
                  if os.path.join(args.data_root, IMAGE_DIRS[r.folder], r.image) not in bad]
        dump(args.data_root, usable, imsize=args.imsize, n=args.dump)
    print("FAILED" if failed else "OK", file=log)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
