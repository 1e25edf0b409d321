"""Split-file layouts, one module each: ``parse(entry, where) -> Ref`` reads one raw entry of a split file.

    coco     (unc, unc+, gref, gref_umd, synthref): (file, {'height', 'width'}, [x, y, w, h], phrase, polygons)
    referit  (file, unused, [x0, y0, x1, y1], phrase, unused)
    flickr   (file, [x0, y0, x1, y1], phrase)
    mixup    (file, size dict | 'flickr' | 'referit', [x, y, w, h], phrase, polygons or unused)
    jsonl    one JSON object per line: {"image", "box": [x0, y0, x1, y1], "text", optional "mask", "id", ...}

Boxes are truncated to integers before any transform (x0 = int(x), x1 = x0 + int(w) for xywh), as the
official loader does. A parser raises ValueError naming ``where`` for an entry it cannot read. Which
dataset uses which parser: datasets.registry.DATASETS.
"""
