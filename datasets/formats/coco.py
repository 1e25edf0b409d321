"""The COCO layout (unc, unc+, gref, gref_umd, synthref):
(file, {'height', 'width'}, [x, y, w, h], phrase, polygons).
"""
from .fields import Ref, Where, box4, boxes_from_xywh, check_strings, size_from_dict, unpack


def parse(entry, where: Where) -> Ref:
    image, size, box, phrase, polygons = unpack(entry, 5, where)
    check_strings(image, phrase, where)
    box = box4(box, where)
    if not isinstance(size, dict):
        raise ValueError(f"{where}: expected a size dict {{'height', 'width'}}, got {size!r}")
    size_hw = size_from_dict(size, where)
    box_xyxy, box_xywh = boxes_from_xywh(box)
    return Ref(image=image, folder=where.folder, box_xyxy=box_xyxy, box_xywh=box_xywh, phrase=phrase,
               size_hw=size_hw, polygons=polygons, source=where.source, entry=where.index)
