"""The dataset table: every --dataset name with its split-file parser, image folder, splits and text layers.

A new split-file format is one parser module (datasets/formats/: ``parse(entry, where) -> Ref``) and one
entry in DATASETS (with its image folder in IMAGE_DIRS when it is a new one); the --dataset flag, the
data pipeline, datasets.verify and the text layers of the model (models.config.select_text_layers) read
it from here. Images live under ``<data_root>``:

    other/images/mscoco/images/train2014   COCO 2014 (unc, unc+, gref, gref_umd, mixup COCO_* files)
    referit/images                         ReferItGame (referit, mixup 'referit')
    Flickr30k/flickr30k-images             Flickr30k Entities (flickr, mixup 'flickr')
    synthref/images                        the embedded synthetic set (python -m datasets.synthetic)
"""
import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from .formats import coco, flickr, mixup, referit

IMAGE_DIRS = {
    "coco": os.path.join("other", "images", "mscoco", "images", "train2014"),
    "referit": os.path.join("referit", "images"),
    "flickr": os.path.join("Flickr30k", "flickr30k-images"),
    "synthref": os.path.join("synthref", "images"),
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
    text_layers: one of TEXT_LAYER_RULES.
    """
    parser: Callable
    folder: Optional[str]
    splits: Tuple[str, ...]
    text_layers: str

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
}


def dataset_spec(dataset: str) -> DatasetSpec:
    """The table's entry for `dataset`; ValueError naming the choices for a name it lacks."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset '{dataset}' (--dataset); choose one of {', '.join(DATASETS)}")
    return DATASETS[dataset]


def check_dataset_split(dataset: str, split: str) -> None:
    splits = dataset_spec(dataset).splits
    if split not in splits:
        raise ValueError(f"dataset '{dataset}' has no split '{split}'; its splits are {', '.join(splits)}")
