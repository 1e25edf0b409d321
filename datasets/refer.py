"""Referring-expression datasets in the official split-file layouts.

Split files live at ``<split_root>/<dataset>/<dataset>_<split>.pth`` (see :mod:`datasets.splitfile`), a JSONL
dataset's at ``<split_root>/<split>.jsonl`` (:mod:`datasets.formats.jsonl`);
each dataset's layout parser, image folder under ``<data_root>`` and splits: :mod:`datasets.registry`,
the layouts themselves: :mod:`datasets.formats`. The object mask is rasterised from the original float
box or, with ``--use_seg_mask`` and a COCO image, from the polygons.

Zero-area boxes (after the truncation) and boxes wholly outside their image: skipped in
training splits (their count is printed); kept in evaluation splits with a printed
warning, so that Acc@0.5 counts every sample of the official split. A box partly outside
its image is clipped to it (counted per split file where the entry gives the image size).

An empty (or blank) expression is kept, as the official loader keeps it, with a printed warning. An image
path that leads outside its image folder (absolute, or with '..') is refused unless ``--allow_outside_paths``.
"""
import os
from dataclasses import replace
from pathlib import PurePath

import numpy as np
import torch
from PIL import Image

from .errors import UserError
from .formats.fields import Ref, Where
from .masks import box_to_mask, segmentation_to_mask
from .registry import DATASETS, IMAGE_DIRS, TRAIN_SPLITS, check_dataset_split, dataset_spec
from .splitfile import UNSAFE_FLAG
from .transforms import CROP_RULES, Record, build_transforms

OUTSIDE_FLAG = "--allow_outside_paths"


def split_path(split_root: str, dataset: str, split: str) -> str:
    return os.path.join(split_root, dataset_spec(dataset).split_file.format(dataset=dataset, split=split))


def split_files(split_root: str, dataset: str, split: str) -> list:
    """The files making up a split: referit has its own trainval file, the others concatenate."""
    if split == "trainval" and dataset != "referit":
        return [split_path(split_root, dataset, s) for s in ("train", "val")]
    return [split_path(split_root, dataset, split)]


def leaves_folder(image: str) -> bool:
    """True for an image path that can lead outside its image folder: absolute, or with a '..' part."""
    return os.path.isabs(image) or os.pardir in PurePath(image).parts


def parse_entry(entry, dataset: str, source: str, index: int, allow_outside: bool = False) -> Ref:
    """Turn entry ``index`` of split file ``source`` (a raw entry of ``dataset``'s layout) into a Ref with the
    dataset's parser; ValueError naming the file and entry otherwise. An image path leading outside its image
    folder is refused unless ``allow_outside``."""
    spec = dataset_spec(dataset)
    where = Where(dataset=dataset, folder=spec.folder, source=source, index=index)
    ref = spec.parser(entry, where)
    if not allow_outside and leaves_folder(ref.image):
        raise ValueError(f"{replace(where, line=ref.line)}: the image path {ref.image!r} leads outside the image "
                         f"folder <data_root>/{IMAGE_DIRS[ref.folder]} (absolute, or with a '..' part); fix the split "
                         f"file, or pass {OUTSIDE_FLAG} if you trust it")
    return ref


def is_degenerate(ref: Ref) -> bool:
    x0, y0, x1, y1 = ref.box_xyxy
    return x1 <= x0 or y1 <= y0


def clip_box(box_xyxy, size_hw) -> tuple:
    """The box cut to an image of size (h, w)."""
    h, w = size_hw
    x0, y0, x1, y1 = box_xyxy
    return min(max(x0, 0), w), min(max(y0, 0), h), min(max(x1, 0), w), min(max(y1, 0), h)


def outside(ref: Ref, size_hw=None) -> str:
    """'partly' or 'wholly' when the box of a non-degenerate ``ref`` crosses or misses its image (size
    ``size_hw``, default the split file's), '' when it lies inside or the size is unknown."""
    size_hw = size_hw or ref.size_hw
    if size_hw is None or is_degenerate(ref):
        return ""
    clipped = clip_box(ref.box_xyxy, size_hw)
    if clipped == tuple(ref.box_xyxy):
        return ""
    x0, y0, x1, y1 = clipped
    return "wholly" if x1 <= x0 or y1 <= y0 else "partly"


def load_refs(split_root: str, dataset: str, split: str, allow_unsafe: bool = False,
              allow_outside: bool = False) -> list:
    """Read and parse every file of a split; FileNotFoundError / ValueError on bad input (see parse_entry):
    the first bad entry's."""
    refs, bad = read_split(split_root, dataset, split, allow_unsafe=allow_unsafe, allow_outside=allow_outside)
    if bad:
        raise ValueError(bad[0] + (f" (and {len(bad) - 1} more entries: python -m datasets.verify lists them)"
                                   if len(bad) > 1 else ""))
    return refs


def read_split(split_root: str, dataset: str, split: str, *, allow_unsafe: bool = False,
               allow_outside: bool = False) -> tuple:
    """(Refs of the entries that parse, messages of those that do not) of every file of a split;
    FileNotFoundError / ValueError for a missing or unreadable file."""
    check_dataset_split(dataset, split)
    refs, bad = [], []
    for path in split_files(split_root, dataset, split):
        if not os.path.isfile(path):
            hints = {"synthref": f"generate it with: python -m datasets.synthetic --out {split_root}",
                     "jsonl": "point --split_root at the folder of your <split>.jsonl files (README \"Train on your "
                              "own data\"; python -m datasets.convert makes them)"}
            hint = hints.get(dataset, "download the official split files and point --split_root at their parent "
                                      "folder")
            raise FileNotFoundError(f"split file {path} not found (--split_root {split_root}, --dataset "
                                    f"{dataset}, split {split}); {hint}")
        for i, entry in enumerate(dataset_spec(dataset).read(path, allow_unsafe=allow_unsafe)):
            try:
                refs.append(parse_entry(entry, dataset, source=path, index=i, allow_outside=allow_outside))
            except ValueError as e:
                bad.append(str(e))
    return refs, bad


def blank_phrases(refs) -> dict:
    """{split file: [entry numbers]} of the entries whose expression is empty or only white space. The official
    loader takes them (the text is start and end of text only), and so do training and evaluation here."""
    found = {}
    for r in refs:
        if not r.phrase.strip():
            found.setdefault(r.source, []).append(r.entry)
    return found


def listed(numbers, most: int = 5) -> str:
    """'3, 7, 9' or '3, 7, 9, 12, 15, ...' for a message."""
    return ", ".join(map(str, numbers[:most])) + (", ..." if len(numbers) > most else "")


class GroundingDataset(torch.utils.data.Dataset):
    """Referring expressions over images; item i is a transformed :class:`Record`."""

    def __init__(self, refs, data_root: str, transform, use_seg_mask: bool = False, name: str = "",
                 keep_original_mask: bool = False):
        self.refs = list(refs)
        self.data_root = data_root
        self.transform = transform
        self.use_seg_mask = use_seg_mask
        self.name = name
        self.keep_original_mask = keep_original_mask   # evaluation: the mask metrics' ground truth

    def __len__(self):
        return len(self.refs)

    def image_path(self, ref: Ref) -> str:
        return os.path.join(self.data_root, IMAGE_DIRS[ref.folder], ref.image)

    def _where(self, idx: int) -> str:
        ref = self.refs[idx]
        return f"{self.name} sample {idx}" + (f", split file {ref.source}" if ref.source else "")

    def _open(self, idx: int):
        """(ref, path, image with its header read); a UserError naming the image, the split file and the fix."""
        ref = self.refs[idx]
        path = self.image_path(ref)
        try:
            img = Image.open(path)
        except FileNotFoundError:
            raise UserError(f"image {path} ({self._where(idx)}) not found: check --data_root (images of "
                            f"'{ref.folder}' belong in <data_root>/{IMAGE_DIRS[ref.folder]}); "
                            f"python -m datasets.verify lists every missing image") from None
        except OSError as e:
            raise UserError(f"image {path} ({self._where(idx)}) cannot be read ({e}); replace the file "
                            f"(python -m datasets.verify lists every unreadable image)") from None
        h, w = img.height, img.width
        if ref.size_hw is not None and ref.size_hw != (h, w):
            raise UserError(f"image {path} ({self._where(idx)}) is {w}x{h} but its split-file entry says "
                            f"{ref.size_hw[1]}x{ref.size_hw[0]}; the image or the split file is wrong")
        return ref, path, img

    def object_mask(self, ref: Ref, h: int, w: int) -> np.ndarray:
        """[h, w] bool array: the polygons (or a JSONL line's RLE) with --use_seg_mask on samples that have them,
        else the box."""
        if self.use_seg_mask and ref.polygons is not None:
            try:
                return segmentation_to_mask(ref.polygons, h, w)
            except (TypeError, ValueError) as e:
                raise UserError(f"{self.name}: the mask of {ref.image} (split file {ref.source}, entry {ref.entry}) "
                                f"is not a COCO polygon list ({e}); fix that entry, or drop --use_seg_mask to "
                                f"supervise with the box") from None
        return box_to_mask(ref.box_xywh, h, w)

    def __getitem__(self, idx: int) -> Record:
        ref, path, img = self._open(idx)
        box = clip_box(ref.box_xyxy, (img.height, img.width))   # a box past the edge: its part in the image
        obj_mask = self.object_mask(ref, img.height, img.width)
        record = Record(image=img, box=torch.tensor(box, dtype=torch.float32), phrase=ref.phrase.lower(),
                        obj_mask=obj_mask, image_file=ref.image,
                        original_mask=obj_mask if self.keep_original_mask else None)
        try:
            return self.transform(record)
        except (OSError, SyntaxError) as e:    # pixel data is decoded lazily, inside the first resize
            raise UserError(f"image {path} ({self._where(idx)}) cannot be decoded ({e}); replace the file "
                            f"(python -m datasets.verify lists every unreadable image)") from None


def screen_boxes(refs, name: str, train: bool) -> list:
    """Zero-area boxes and boxes wholly outside their image are skipped in training and kept in evaluation
    (they count as misses); boxes partly outside are clipped to the image (GroundingDataset). One line per
    kind; outside boxes per split file. Needs the image size, so here only for entries that carry it."""
    degenerate = sum(map(is_degenerate, refs))
    if degenerate and train:
        print(f"{name}: skipped {degenerate} samples whose box has zero area after integer truncation")
    elif degenerate:
        print(f"{name}: warning: {degenerate} samples have a zero-area box (kept, they count as misses)")
    kinds = [outside(r) for r in refs]
    for source in dict.fromkeys(r.source for r, kind in zip(refs, kinds) if kind):
        partly, wholly = (sum(r.source == source and k == kind for r, k in zip(refs, kinds))
                          for kind in ("partly", "wholly"))
        if partly:
            print(f"{name}: warning: {partly} boxes extend past their image in {source}; clipped to the image")
        if wholly and train:
            print(f"{name}: skipped {wholly} samples whose box lies wholly outside its image in {source}")
        elif wholly:
            print(f"{name}: warning: {wholly} samples have a box wholly outside its image in {source} (kept, they "
                  "count as misses)")
    if not train:
        return refs
    return [r for r, kind in zip(refs, kinds) if kind != "wholly" and not is_degenerate(r)]


def split_problems(refs, dataset: str, data_root: str) -> list:
    """What the dataset's own checks (DatasetSpec.validate) find in a parsed split against its images."""
    validate = dataset_spec(dataset).validate
    return validate(refs, lambda r: os.path.join(data_root, IMAGE_DIRS[r.folder], r.image)) if validate else []


def check_split(refs, dataset: str, data_root: str) -> None:
    """A UserError with the first problem split_problems finds, and how many more there are."""
    found = split_problems(refs, dataset, data_root)
    if found:
        more = f" (and {len(found) - 1} more: python -m datasets.verify lists them)" if len(found) > 1 else ""
        raise UserError(found[0] + more)


def build_dataset(split: str, args) -> GroundingDataset:
    """The dataset of ``args.dataset``/``split`` with the train or eval transform.

    Reads args.dataset, data_root, split_root, use_seg_mask, allow_unsafe_pickle, allow_outside_paths and the
    transform fields (imsize, aug_scale, aug_crop, aug_blur, aug_translate, crop_rule, fast_jpeg).
    """
    check_dataset_split(args.dataset, split)
    refs = load_refs(args.split_root, args.dataset, split, allow_unsafe=getattr(args, "allow_unsafe_pickle", False),
                     allow_outside=getattr(args, "allow_outside_paths", False))
    name = f"{args.dataset} {split}"
    check_split(refs, args.dataset, args.data_root)
    for source, entries in blank_phrases(refs).items():
        print(f"{name}: warning: {len(entries)} empty expressions in {source} (entries {listed(entries)}); kept, "
              "as the official loader does")
    train = split in TRAIN_SPLITS
    refs = screen_boxes(refs, name, train)
    if not refs:
        files = ", ".join(split_files(args.split_root, args.dataset, split))
        raise ValueError(f"{name} has no usable samples (files: {files}); check --split_root / --dataset or "
                         f"regenerate the split files")
    for folder in sorted({r.folder for r in refs}):
        root = os.path.join(args.data_root, IMAGE_DIRS[folder])
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root} for {name} not found; set --data_root to the folder "
                                    f"that contains {IMAGE_DIRS[folder]}")
    return GroundingDataset(refs, args.data_root, build_transforms(args, train),
                            use_seg_mask=args.use_seg_mask, name=name, keep_original_mask=not train)


# --data_root / --split_root: the training default and what the folder holds
DATA_PATHS = {"data_root": ("./data/image_data/", "folder holding the image folders (other/, referit/, Flickr30k/, "
                                                  "synthref/); --dataset jsonl: the images folder"),
              "split_root": ("./data/pseudo_samples/", "folder holding <dataset>/<dataset>_<split>.pth; --dataset "
                                                       "jsonl: the folder of <split>.jsonl")}


def add_data_path_args(parser, fallback: str = "", required: bool = False, *, names=tuple(DATA_PATHS)):
    """--data_root and --split_root (or those of `names`), defined once for every tool: with the training
    defaults; or, for a tool that takes them from elsewhere first (`fallback`, e.g. "the checkpoint's"), None
    unless given; or required."""
    for name in names:
        default, what = DATA_PATHS[name]
        if required:
            parser.add_argument(f"--{name}", required=True, help=what)
        elif fallback:
            parser.add_argument(f"--{name}", help=f"{what}; default: {fallback}, else {default}")
        else:
            parser.add_argument(f"--{name}", default=default, type=str, help=what)
    return parser


def add_data_args(parser):
    """Register the data flags (official names and defaults) on an argparse parser.

    --dataset, --imsize and --max_query_len are model flags too: add the model flags after these with
    models.flags.add_model_args(parser, shared=False).
    """
    parser.add_argument("--dataset", default="referit", type=str, choices=list(DATASETS),
                        help="dataset name; 'synthref' is the embedded synthetic set")
    add_data_path_args(parser)
    flags = [
        ("--imsize", dict(default=224, type=int, help="input side S of the padded square image")),
        ("--max_query_len", dict(default=77, type=int, help="text context length in tokens")),
        ("--aug_blur", dict(action="store_true", help="Gaussian blur augmentation (p 0.5)")),
        ("--aug_crop", dict(action="store_true", help="random resize+crop augmentation (p 0.5)")),
        ("--aug_scale", dict(action="store_true", help="multi-scale augmentation")),
        ("--aug_translate", dict(action="store_true", help="random padding offset")),
        ("--crop_rule", dict(default="official", choices=CROP_RULES,
                             help="which random crop --aug_crop keeps: 'official', the authors' test (box centre "
                                  "against the crop's corner, x and y crossed); 'box', the crop's corner above-left "
                                  "of the box's (docs/method.md)")),
        ("--fast_jpeg", dict(action="store_true",
                             help="training split only: decode large JPEGs at reduced size (DCT draft) before "
                                  "resizing; faster, but other pixels than the authors' loader")),
        ("--use_seg_mask", dict(action="store_true",
                                help="supervise masks with the COCO polygons instead of the filled box")),
    ]
    for flag, kwargs in flags:
        parser.add_argument(flag, **kwargs)
    return add_split_file_args(parser)


def add_split_file_args(parser):
    """The opt-ins for split files from a trusted source: every tool that reads split files takes them."""
    parser.add_argument(UNSAFE_FLAG, action="store_true",
                        help="unpickle split files without restrictions (can run code; trusted files only)")
    parser.add_argument(OUTSIDE_FLAG, action="store_true",
                        help="read images a split file names outside their image folder (absolute paths, '..')")
    return parser
