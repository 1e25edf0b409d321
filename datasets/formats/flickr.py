"""The Flickr30k Entities layout: (file, [x0, y0, x1, y1], phrase); no size, no polygons."""
from .fields import Ref, Where, box4, boxes_from_xyxy, check_strings, unpack


def parse(entry, where: Where) -> Ref:
    image, box, phrase = unpack(entry, 3, where)
    check_strings(image, phrase, where)
    box_xyxy, box_xywh = boxes_from_xyxy(box4(box, where))
    return Ref(image=image, folder=where.folder, box_xyxy=box_xyxy, box_xywh=box_xywh, phrase=phrase,
               size_hw=None, polygons=None, source=where.source, entry=where.index)
