"""Converters to and from the JSONL format (README "Train on your own data"; datasets.formats.jsonl).

    python -m datasets.convert to-jsonl --dataset unc --split_root SPLITS --out my_unc
    python -m datasets.convert to-split-files --jsonl my_unc --dataset unc --out SPLITS2
    python -m datasets.convert refer --refs "refer/data/refcoco/refs(unc).p" \\
        --instances refer/data/refcoco/instances.json --out refcoco_unc

to-jsonl writes one <split>.jsonl per split file of an authors' dataset, to-split-files the authors' split files
(<out>/<dataset>/<dataset>_<split>.pth) of a JSONL folder, in the dataset's layout: the round trip gives the same
images, boxes (as numbers: the same after the authors' integer truncation), phrases and polygons. refer turns the
`refer` toolkit's refs(<split_by>).p and COCO instances.json (RefCOCO, RefCOCO+, RefCOCOg) into one JSONL line
per expression, with the object's segmentation as its mask. Pickles are read by the split files' safe unpickler.
"""
import argparse
import json
import os
import sys
from decimal import Decimal
from pathlib import PurePosixPath

import numpy as np
import torch

from .errors import UserError, reports_errors
from .formats import coco, flickr, jsonl, mixup, referit
from .formats.jsonl import EXACT, image_size
from .refer import add_data_path_args, add_split_file_args, read_split, split_files, split_path
from .registry import DATASETS, IMAGE_DIRS, dataset_spec, dataset_splits
from .splitfile import load_pickled_list

# parser -> (index of the box in an entry, whether it is [x, y, w, h] rather than [x0, y0, x1, y1])
BOXES = {coco.parse: (2, True), mixup.parse: (2, True), referit.parse: (2, False), flickr.parse: (1, False)}


def decimal_box(box, xywh: bool) -> list:
    """[x0, y0, x1, y1] as exact decimals of a box given as floats: x1 = x + w exactly for an [x, y, w, h] box."""
    x, y, a, b = (Decimal(repr(float(v))) for v in box)
    return [x, y, EXACT.add(x, a), EXACT.add(y, b)] if xywh else [x, y, a, b]


def jsonl_line(image: str, box, text: str, **optional) -> str:
    """One JSONL line; `box` in decimals, written as they are; optional keys left out when None."""
    items = {"image": image, "box": box, "text": text, **{k: v for k, v in optional.items() if v is not None}}
    values = {k: "[" + ", ".join(map(str, v)) + "]" if k == "box" else json.dumps(v, ensure_ascii=False)
              for k, v in items.items()}
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in values.items()) + "}\n"


def plain_polygons(polygons):
    """COCO polygons as lists of floats (split files may hold numpy arrays), None when absent."""
    if polygons is None or isinstance(polygons, str):
        return None
    return [np.asarray(p, dtype=np.float64).ravel().tolist() for p in polygons]


def split_to_jsonl(split_root: str, dataset: str, split: str, *, out: str, allow_unsafe: bool = False) -> int:
    """<out>/<split>.jsonl from the split file of an authors' dataset; returns its number of lines."""
    box_at, xywh = BOXES[dataset_spec(dataset).parser]
    path = split_path(split_root, dataset, split)
    raw = load_pickled_list(path, allow_unsafe=allow_unsafe)
    refs, bad = read_split(split_root, dataset, split, allow_unsafe=allow_unsafe, allow_outside=True)
    if bad:
        raise ValueError(bad[0])
    with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
        for entry, ref in zip(raw, refs):
            image = ref.image if dataset_spec(dataset).folder else str(PurePosixPath(IMAGE_DIRS[ref.folder],
                                                                                     ref.image))
            size = ref.size_hw or (None, None)
            f.write(jsonl_line(image, decimal_box(entry[box_at], xywh), ref.phrase,
                               mask=plain_polygons(ref.polygons), height=size[0], width=size[1]))
    return len(refs)


def folder_of(image: str):
    """(IMAGE_DIRS key, file name in it) of a mixup JSONL image path."""
    for key, folder in IMAGE_DIRS.items():
        if folder and image.startswith(folder + "/") and key in ("coco", "flickr", "referit"):
            return key, image[len(folder) + 1:]
    raise ValueError(f"image {image!r} is in none of the mixup image folders "
                     f"{', '.join(IMAGE_DIRS[k] for k in ('coco', 'flickr', 'referit'))}")


def size_dict(ref, data_root: str) -> dict:
    """{'height', 'width'} of a line: its own, else its image's header (under --data_root)."""
    if ref.size_hw is not None:
        return {"height": ref.size_hw[0], "width": ref.size_hw[1]}
    size, reason = image_size(os.path.join(data_root, ref.image))
    if reason:
        raise UserError(f"{ref.source}:{ref.line}: the layout stores the image size, and image {ref.image} under "
                        f"--data_root {data_root} {reason}: add \"width\" and \"height\" to the line, or pass "
                        "--data_root (the JSONL images folder)")
    return {"height": size[0], "width": size[1]}


def entry_of(ref, box: list, *, dataset: str, data_root: str) -> tuple:
    """The authors' split-file entry of one parsed JSONL line in `dataset`'s layout (`box`: as written)."""
    parser = dataset_spec(dataset).parser
    xyxy = [float(v) for v in box]
    if parser is referit.parse:
        return ref.image, "", xyxy, ref.phrase, ""
    if parser is flickr.parse:
        return ref.image, xyxy, ref.phrase
    image, folder = (ref.image, "coco") if parser is coco.parse else folder_of(ref.image)[::-1]
    xywh = list(ref.box_xywh)
    if folder == "coco":
        return image, size_dict(ref, data_root), xywh, ref.phrase, ref.polygons
    return image, folder, xywh, ref.phrase, None


def jsonl_to_split(folder: str, split: str, *, dataset: str, out: str, data_root: str = "") -> int:
    """<out>/<dataset>/<dataset>_<split>.pth from <folder>/<split>.jsonl; returns its number of entries."""
    refs, bad = read_split(folder, "jsonl", split, allow_outside=True)
    if bad:
        raise ValueError(bad[0])
    boxes = [json.loads(line.text, parse_float=Decimal)["box"] for line in jsonl.read(split_path(folder, "jsonl",
                                                                                                   split))]
    entries = [entry_of(ref, box, dataset=dataset, data_root=data_root) for ref, box in zip(refs, boxes)]
    os.makedirs(os.path.join(out, dataset), exist_ok=True)
    torch.save(entries, split_path(out, dataset, split))
    return len(entries)


def refer_to_jsonl(refs_path: str, instances_path: str, out: str, allow_unsafe: bool = False) -> dict:
    """<out>/<split>.jsonl from the refer toolkit's refs(<split_by>).p and COCO instances.json: one line per
    expression (its 'sent'), the annotation's bbox and segmentation, the sentence id as id. Returns
    {split: lines}."""
    refs = load_pickled_list(refs_path, allow_unsafe=allow_unsafe)
    try:
        with open(instances_path, encoding="utf-8") as f:
            instances = json.load(f)
        images = {im["id"]: im for im in instances["images"]}
        anns = {a["id"]: a for a in instances["annotations"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--instances {instances_path} is not a COCO instances file ({type(e).__name__}: "
                        f"{e})") from None
    lines = {}
    for i, ref in enumerate(refs):
        try:
            ann, image = anns[ref["ann_id"]], images[ref["image_id"]]
            lines.setdefault(ref["split"], []).extend(
                jsonl_line(image["file_name"], decimal_box(ann["bbox"], True), s["sent"], mask=ann["segmentation"],
                           id=s["sent_id"], width=image["width"], height=image["height"])
                for s in ref["sentences"])
        except (KeyError, TypeError) as e:
            raise UserError(f"--refs {refs_path}, ref {i}: {type(e).__name__} {e} (not in the refer toolkit's layout, "
                            "or not from this --instances file)") from None
    for split, text in lines.items():
        with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(text)
    return {split: len(text) for split, text in lines.items()}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m datasets.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_jsonl = commands.add_parser("to-jsonl", help="the authors' split files of a dataset -> <split>.jsonl")
    to_jsonl.add_argument("--dataset", required=True, choices=[d for d, s in DATASETS.items() if s.parser in BOXES])
    add_data_path_args(to_jsonl, required=True, names=("split_root",))
    to_jsonl.add_argument("--split", nargs="+", help="default: every split file present")
    back = commands.add_parser("to-split-files", help="<split>.jsonl files -> the authors' split files")
    back.add_argument("--jsonl", required=True, help="folder holding <split>.jsonl")
    back.add_argument("--dataset", required=True, choices=[d for d, s in DATASETS.items() if s.parser in BOXES],
                      help="whose layout to write")
    back.add_argument("--split", nargs="+", help="default: every <split>.jsonl present")
    add_data_path_args(back, names=("data_root",))     # the COCO layout's image sizes, for lines without them
    refer = commands.add_parser("refer", help="refer toolkit annotations (RefCOCO/+/g) -> <split>.jsonl")
    refer.add_argument("--refs", required=True, help="refs(<split_by>).p, e.g. refer/data/refcoco/refs(unc).p")
    refer.add_argument("--instances", required=True, help="the COCO instances.json beside it")
    for command in (to_jsonl, back, refer):
        command.add_argument("--out", required=True, help="output folder")
        add_split_file_args(command)
    return parser


@reports_errors("datasets.convert")
def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.command == "refer":
        counts = refer_to_jsonl(args.refs, args.instances, args.out, allow_unsafe=args.allow_unsafe_pickle)
    elif args.command == "to-jsonl":
        splits = args.split or [s for s in dataset_splits(args.dataset, args.split_root)
                                if len(split_files(args.split_root, args.dataset, s)) == 1
                                and os.path.isfile(split_path(args.split_root, args.dataset, s))]
        counts = {s: split_to_jsonl(args.split_root, args.dataset, s, out=args.out,
                                    allow_unsafe=args.allow_unsafe_pickle) for s in splits}
    else:
        splits = args.split or [s for s in dataset_splits("jsonl", args.jsonl)
                                if os.path.isfile(split_path(args.jsonl, "jsonl", s))]
        counts = {s: jsonl_to_split(args.jsonl, s, dataset=args.dataset, out=args.out, data_root=args.data_root)
                  for s in splits}
    if not counts:
        raise UserError(f"nothing to convert: no split found for {args.command}; check the input folder")
    for split, count in counts.items():
        print(f"{split}: {count} {'lines' if args.command != 'to-split-files' else 'entries'}")
    if args.command == "to-jsonl" and dataset_spec(args.dataset).folder:
        print(f"images: --data_root <data_root>/{IMAGE_DIRS[dataset_spec(args.dataset).folder]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
