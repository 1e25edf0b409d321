"""The mixup layout, the five sets together: (file, size dict | 'flickr' | 'referit', [x, y, w, h], phrase,
polygons or unused).

Each entry names its image folder: a file whose name starts with ``COCO_`` is a COCO image, any other is
marked 'flickr' or 'referit' in its second field. Every box is xywh, as the official loader reads it.
"""
from .fields import Ref, Where, box4, boxes_from_xywh, check_strings, size_from_dict, unpack

MARKED_FOLDERS = ("flickr", "referit")


def parse(entry, where: Where) -> Ref:
    image, size, box, phrase, polygons = unpack(entry, 5, where)
    check_strings(image, phrase, where)
    box = box4(box, where)
    if image.split("_")[0] == "COCO":
        folder = "coco"
    elif isinstance(size, str) and size in MARKED_FOLDERS:
        folder, polygons = size, None
    else:
        raise ValueError(f"{where}: mixup entry {image!r} is neither a COCO_* file nor marked "
                         f"'flickr'/'referit' (second field {size!r})")
    size_hw = size_from_dict(size, where) if isinstance(size, dict) else None
    box_xyxy, box_xywh = boxes_from_xywh(box)
    return Ref(image=image, folder=folder, box_xyxy=box_xyxy, box_xywh=box_xywh, phrase=phrase, size_hw=size_hw,
               polygons=polygons, source=where.source, entry=where.index)
