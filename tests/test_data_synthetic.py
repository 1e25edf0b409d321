"""The embedded synthetic set: layout, determinism, unambiguous expressions, loader round trip."""
import hashlib
import json
import os
import random

import numpy as np
import torch
from PIL import Image

from datasets import Collate, build_dataset
from datasets.masks import polygons_to_mask
from datasets.synthetic import COLOURS, GROUPS, SHAPES, baselines, expression_groups, generate, main
from utils.engine import accuracy_by_group
from tests.data_helpers import args_for

RELATION_WORDS = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}
LOCATION_WORDS = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom"}


def load(root, split):
    samples = torch.load(os.path.join(root, "synthref", f"synthref_{split}.pth"), weights_only=True)
    with open(os.path.join(root, "synthref", f"synthref_{split}_scenes.json")) as f:
        return samples, json.load(f)


def described(objs, words):
    """Objects whose colour / shape / size match the words of a description like 'the small red circle'."""
    return [o for o in objs if all(w in (o["colour"], o["shape"], o["size"], "the", "object") for w in words.split())]


def centre(o):
    x0, y0, x1, y1 = o["box_xyxy"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def denotes(objs, phrase, side):
    """An independent reading of an expression: the objects it can refer to."""
    for words, rel in RELATION_WORDS.items():
        if f" {words} " in phrase:
            head, anchor = phrase.split(f" {words} ")
            anchors = described(objs, anchor)
            assert len(anchors) == 1, f"anchor of '{phrase}' is not unique"
            b = anchors[0]["box_xyxy"]
            beyond = {"left of": lambda a: a[2] <= b[0], "right of": lambda a: a[0] >= b[2],
                      "above": lambda a: a[3] <= b[1], "below": lambda a: a[1] >= b[3]}[rel]
            return [o for o in described(objs, head) if o is not anchors[0] and beyond(o["box_xyxy"])]
    for words, where in LOCATION_WORDS.items():
        if phrase.endswith(words):
            cands = described(objs, phrase[:-len(words)])
            axis, sign = {"left": (0, -1), "right": (0, 1), "top": (1, -1), "bottom": (1, 1)}[where]
            ranked = sorted(cands, key=lambda o: sign * centre(o)[axis], reverse=True)
            if len(ranked) > 1:
                assert abs(centre(ranked[0])[axis] - centre(ranked[1])[axis]) >= 0.12 * side - 1e-6
            return ranked[:1]
    return described(objs, phrase)


def test_layout_and_unique_expressions(synth_dir):
    for split in ("train", "val", "test"):
        samples, meta = load(synth_dir, split)
        assert len(samples) == {"train": 60, "val": 20, "test": 40}[split] == len(meta["categories"])
        for (name, size, (x, y, w, h), phrase, polygons), category in zip(samples, meta["categories"]):
            objs = meta["images"][name]
            assert 3 <= len(objs) <= 5
            assert set(size) == {"height", "width"} and max(size.values()) == 96
            hits = denotes(objs, phrase, min(size.values()))
            assert [o["box_xyxy"] for o in hits] == [[x, y, x + w, y + h]], (phrase, category)
            if category == "attribute":
                assert not any(s in phrase for s in ("left", "right", "top", "bottom", "above", "below"))


def test_categories_cover_attributes_space_and_mixes(synth_dir):
    _, meta = load(synth_dir, "train")
    assert {"attribute", "location", "relation"} <= set(meta["categories"])
    samples, _ = load(synth_dir, "train")
    phrases = [s[3] for s in samples]
    assert any(p.split()[1] in ("small", "large") for p in phrases)
    assert any(any(w in p for w in RELATION_WORDS) for p in phrases)


def test_pixels_inside_the_mask_have_the_object_colour(synth_dir):
    samples, meta = load(synth_dir, "test")
    for name, size, box, phrase, polygons in samples[:10]:
        img = np.asarray(Image.open(os.path.join(synth_dir, "synthref", "images", name)).convert("RGB"), np.float32)
        mask = polygons_to_mask(polygons, size["height"], size["width"])
        target = [o for o in meta["images"][name] if o["box_xyxy"][:2] == [int(box[0]), int(box[1])]][0]
        ys, xs = np.nonzero(mask)
        assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (box[1], box[0], box[1] + box[3], box[0] + box[2])
        interior = mask & np.roll(mask, 2, 0) & np.roll(mask, -2, 0) & np.roll(mask, 2, 1) & np.roll(mask, -2, 1)
        colour = np.median(img[interior], axis=0)
        assert np.abs(colour - np.asarray(COLOURS[target["colour"]])).max() < 30
        assert target["shape"] in SHAPES


def test_deterministic_by_seed(tmp_path):
    def digest(root):
        h = hashlib.sha256()
        for dirpath, _, files in sorted(os.walk(root)):
            for f in sorted(files):
                h.update(f.encode() + open(os.path.join(dirpath, f), "rb").read())
        return h.hexdigest()
    generate(str(tmp_path / "a"), num_train=12, num_val=4, num_test=4, seed=5, imsize=64)
    generate(str(tmp_path / "b"), num_train=12, num_val=4, num_test=4, seed=5, imsize=64, workers=2)
    generate(str(tmp_path / "c"), num_train=12, num_val=4, num_test=4, seed=6, imsize=64)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_loader_reads_the_set(synth_dir):
    train = build_dataset("train", args_for("synthref", synth_dir, imsize=64, aug_crop=True, aug_scale=True,
                                            aug_translate=True, use_seg_mask=True))
    test = build_dataset("test", args_for("synthref", synth_dir, imsize=64, use_seg_mask=True))
    random.seed(0)
    batch = Collate()([train[i] for i in range(8)])
    assert batch.images.shape == (8, 3, 64, 64) and batch.obj_masks.shape == (8, 64, 64)
    assert bool((batch.boxes > 0).all()) and bool((batch.boxes <= 1).all())
    assert len(test) == 40 and test[0].phrase == load(synth_dir, "test")[0][0][3]
    assert any(int(test[i].pixel_mask.sum()) > 0 for i in range(5))      # non-square images are padded


def test_baselines_and_cli(synth_dir, capsys):
    table = baselines(str(synth_dir), "test")
    assert list(table) == ["all", "attributes only", "location or relation"]
    scores = table["all"]
    assert set(scores) == {"centre", "largest", "random_object", "attribute_only"}
    assert all(0.0 <= v <= 1.0 for group in table.values() for v in group.values())
    assert scores["centre"] < 0.2 and scores["random_object"] < 0.45 < scores["attribute_only"]
    # attribute words alone pick the object of every expression of the first group, of none of the second
    assert table["attributes only"]["attribute_only"] == 1.0 > table["location or relation"]["attribute_only"]
    groups = expression_groups(str(synth_dir), "test")
    share = groups.count("attributes only") / len(groups)
    expected = share + (1 - share) * table["location or relation"]["attribute_only"]
    assert abs(scores["attribute_only"] - expected) < 1e-9
    main(["--baseline", str(synth_dir)])
    out = capsys.readouterr().out
    assert "all | attributes only | location or relation" in out and "largest" in out


def test_each_expression_is_labelled_by_what_it_needs(synth_dir):
    """Read independently of the generator: an 'attributes only' expression's colour/shape/size words pick
    exactly its object; a 'location or relation' one's leave several candidates, the object among them."""
    for split in ("train", "val", "test"):
        samples, meta = load(synth_dir, split)
        groups = expression_groups(str(synth_dir), split)
        assert len(groups) == len(samples) and set(groups) == {"attributes only", "location or relation"}
        for (name, _, (x, y, w, h), phrase, _), group, category in zip(samples, groups, meta["categories"]):
            assert group == GROUPS[category]
            head = phrase
            for words in list(RELATION_WORDS) + list(LOCATION_WORDS):
                head = head.split(f" {words}")[0]
            candidates = [o["box_xyxy"] for o in described(meta["images"][name], head)]
            assert [x, y, x + w, y + h] in candidates
            assert (len(candidates) == 1) == (group == "attributes only"), (phrase, group)


def test_accuracy_by_group_counts_each_group_from_its_labels():
    ious = [0.9, 0.2, 0.6, 0.5, 0.49]
    groups = ["attributes only", "location or relation", "attributes only", "location or relation",
              "attributes only"]
    assert accuracy_by_group(ious, groups) == {"attributes only": {"count": 3, "acc": 2 / 3},
                                               "location or relation": {"count": 2, "acc": 0.5}}
