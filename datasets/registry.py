"""The dataset table: every --dataset name with its split-file parser, image folder, splits and text layers.

A new split-file format is one parser module (datasets/formats/: ``parse(entry, where) -> Ref``) and one
entry in DATASETS (with its image folder in IMAGE_DIRS when it is a new one); the --dataset flag, the
data pipeline, datasets.verify and the text layers of the model (models.config.select_text_layers) read
it from here. A format whose files are not pickled lists gives its reader and file name (``jsonl``: one
JSON object per line, README "Train on your own data"). Images live under ``<data_root>``:

    other/images/mscoco/images/train2014   COCO 2014 (unc, unc+, gref, gref_umd, mixup COCO_* files)
    referit/images                         ReferItGame (referit, mixup 'referit')
    Flickr30k/flickr30k-images             Flickr30k Entities (flickr, mixup 'flickr')
    synthref/images                        the embedded synthetic set (python -m datasets.synthetic)
    .                                      a JSONL dataset: --data_root is its images folder
"""
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from .formats import coco, flickr, jsonl, mixup, referit
from .splitfile import load_pickled_list

IMAGE_DIRS = {
    "coco": os.path.join("other", "images", "mscoco", "images", "train2014"),
    "referit": os.path.join("referit", "images"),
    "flickr": os.path.join("Flickr30k", "flickr30k-images"),
    "synthref": os.path.join("synthref", "images"),
    "jsonl": "",
}
# Which text blocks feed the bridges (paper section 3.2); 12 blocks: [11], [5, 11], all twelve.
TEXT_LAYER_RULES = ("last", "middle_last", "all")
TRAIN_SPLITS = ("train", "trainval", "train_pseudo")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset.

    parser: ``parse(entry, where) -> Ref`` of its split-file layout (datasets.formats).
    folder: the key of IMAGE_DIRS holding its images; None when each entry names its own (mixup).
    splits: the split names it has (``<dataset>_<split>.pth`` files).
    text_layers: one of TEXT_LAYER_RULES, unless --text_layers gives another.
    split_file: where a split's file lies under --split_root.
    read: ``read(path, allow_unsafe=...) -> list`` of the raw entries of one split file.
    more_splits: any other split name is a split too, when its file exists.
    validate: ``validate(refs, image_path) -> [problem]``: checks of a whole split against its images, run
        before training or evaluating on it (`image_path(ref)` is the image's file); None: no such checks.
    """
    parser: Callable
    folder: Optional[str]
    splits: Tuple[str, ...]
    text_layers: str
    split_file: str = os.path.join("{dataset}", "{dataset}_{split}.pth")
    read: Callable = load_pickled_list
    more_splits: bool = False
    validate: Optional[Callable] = None

    def __post_init__(self):
        if self.text_layers not in TEXT_LAYER_RULES:
            raise ValueError(f"text_layers {self.text_layers!r}: choose one of {', '.join(TEXT_LAYER_RULES)}")
        if self.folder is not None and self.folder not in IMAGE_DIRS:
            raise ValueError(f"image folder {self.folder!r} is not in datasets.registry.IMAGE_DIRS "
                             f"({', '.join(IMAGE_DIRS)}); add it there first")


_UNC = ("train", "val", "testA", "testB")
_TVT = ("train", "val", "test")
_EXTRA = ("trainval", "train_pseudo")
DATASETS = {
    "unc": DatasetSpec(parser=coco.parse, folder="coco", splits=_UNC + _EXTRA, text_layers="last"),
    "unc+": DatasetSpec(parser=coco.parse, folder="coco", splits=_UNC + _EXTRA, text_layers="middle_last"),
    "gref": DatasetSpec(parser=coco.parse, folder="coco", splits=("train", "val") + _EXTRA, text_layers="all"),
    "gref_umd": DatasetSpec(parser=coco.parse, folder="coco", splits=_TVT + _EXTRA, text_layers="all"),
    "referit": DatasetSpec(parser=referit.parse, folder="referit", splits=_TVT + _EXTRA, text_layers="middle_last"),
    "flickr": DatasetSpec(parser=flickr.parse, folder="flickr", splits=_TVT + _EXTRA, text_layers="last"),
    "mixup": DatasetSpec(parser=mixup.parse, folder=None, splits=_TVT + _EXTRA, text_layers="last"),
    "synthref": DatasetSpec(parser=coco.parse, folder="synthref", splits=_TVT, text_layers="last"),
    # Short expressions as RefCOCO's and Flickr30k's, whose rule it takes: the last text block.
    "jsonl": DatasetSpec(parser=jsonl.parse, folder="jsonl", splits=_TVT, text_layers="last",
                         split_file="{split}.jsonl", read=jsonl.read, more_splits=True, validate=jsonl.problems),
}
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def dataset_spec(dataset: str) -> DatasetSpec:
    """The table's entry for `dataset`; ValueError naming the choices for a name it lacks."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset '{dataset}' (--dataset); choose one of {', '.join(DATASETS)}")
    return DATASETS[dataset]


def check_dataset_split(dataset: str, split: str) -> None:
    spec = dataset_spec(dataset)
    if spec.more_splits and SPLIT_NAME.fullmatch(split):
        return
    if split not in spec.splits:
        other = " or another name of letters, digits and _.+-" if spec.more_splits else ""
        raise ValueError(f"dataset '{dataset}' has no split '{split}'; its splits are {', '.join(spec.splits)}"
                         f"{other}")


def dataset_splits(dataset: str, split_root: str) -> Tuple[str, ...]:
    """The splits of `dataset`: the table's, then for a dataset with more_splits those whose file lies under
    `split_root` (in name order)."""
    spec = dataset_spec(dataset)
    if not spec.more_splits:
        return spec.splits
    head, tail = spec.split_file.format(dataset=dataset, split="\0").split("\0")
    folder = os.path.join(split_root, os.path.dirname(head))
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    prefix = os.path.basename(head)
    found = [n[len(prefix):len(n) - len(tail)] for n in names if n.startswith(prefix) and n.endswith(tail)]
    return spec.splits + tuple(s for s in found if s not in spec.splits and SPLIT_NAME.fullmatch(s))
