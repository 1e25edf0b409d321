"""What every layout's parser shares: the parsed entry (`Ref`), its place (`Where`) and the field checks."""
from dataclasses import dataclass
from typing import NamedTuple, Optional


class Ref(NamedTuple):
    """One parsed split-file entry."""
    image: str                        # file name inside its image folder
    folder: str                       # key of datasets.registry.IMAGE_DIRS
    box_xyxy: tuple                   # 4 ints, pixels of the original image
    box_xywh: tuple                   # 4 floats as stored (for the box mask)
    phrase: str
    size_hw: Optional[tuple]          # (h, w) from the size dict, None when it comes from the image
    polygons: object                  # COCO polygon list or None
    source: str = ""                  # the split file it comes from, for messages
    entry: int = -1                   # its index in that file
    line: Optional[int] = None        # its line in a text file (JSONL), for messages
    sample_id: object = None          # the id a JSONL line gives it


@dataclass(frozen=True)
class Where:
    """The entry a parser reads: its dataset, the image folder of that dataset and its place, for messages."""
    dataset: str                      # the --dataset name
    folder: Optional[str]             # key of IMAGE_DIRS of the dataset's images; None when entries name theirs
    source: str                       # the split file
    index: int                        # the entry's index in it
    line: Optional[int] = None        # its line, in a text file

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.source}:{self.line}"
        return f"split file {self.source}, entry {self.index}"


def unpack(entry, length: int, where: Where) -> tuple:
    """The entry as a `length`-tuple; ValueError when it is not one."""
    if not isinstance(entry, (tuple, list)) or len(entry) != length:
        got = f"a {len(entry)}-tuple" if isinstance(entry, (tuple, list)) else type(entry).__name__
        raise ValueError(f"{where}: expected a {length}-tuple in the '{where.dataset}' layout, got {got}. "
                         f"Check --dataset and --split_root.")
    return tuple(entry)


def check_strings(image, phrase, where: Where) -> None:
    if not isinstance(image, str) or not isinstance(phrase, str):
        raise ValueError(f"{where}: the image file and phrase must be strings, got {image!r}, {phrase!r}")


def box4(value, where: Where) -> tuple:
    """The box as 4 finite floats."""
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4 or not all(abs(v) < float("inf") for v in box):
        raise ValueError(f"{where}: the box must be 4 finite numbers, got {value!r}")
    return box


def size_from_dict(size: dict, where: Where) -> tuple:
    """(h, w) of a COCO size dict {'height', 'width'}."""
    try:
        return int(size["height"]), int(size["width"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: the size dict needs integer 'height' and 'width', got {size!r}") from None


def boxes_from_xywh(box: tuple) -> tuple:
    """(xyxy truncated as the official loader does, xywh as stored) of an [x, y, w, h] box."""
    x0, y0 = int(box[0]), int(box[1])
    return (x0, y0, x0 + int(box[2]), y0 + int(box[3])), box


def boxes_from_xyxy(box: tuple) -> tuple:
    """(xyxy truncated to integers, xywh in floats) of an [x0, y0, x1, y1] box."""
    return tuple(int(v) for v in box), (box[0], box[1], box[2] - box[0], box[3] - box[1])
