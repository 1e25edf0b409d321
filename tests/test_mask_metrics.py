"""Referring image segmentation metrics (models/mask_metrics.py): the LAVT / CRIS definitions on hand-made masks,
the eval transform undone on non-square images, the polygon ground truth's bounds and errors."""
import os

import numpy as np
import pytest
import torch

from datasets import build_dataset
from datasets.masks import polygons_to_mask
from datasets.transforms import Letterbox
from models.mask_metrics import segmentation_metric, segmentation_summary
from tests.data_helpers import args_for, coco_entry, write_layout
from utils.errors import UserError


def logits_of(mask) -> torch.Tensor:
    """Confident logits (+-10) of a 0/1 mask."""
    return torch.where(torch.as_tensor(np.asarray(mask)) > 0.5, 10.0, -10.0)


def means_of(values: dict) -> dict:
    """What utils.engine.evaluate hands a summary: the mean of each per-sample metric, in dataset order."""
    return {name: sum(v.tolist()) / len(v) for name, v in values.items()}


def test_metrics_on_hand_made_masks():
    """Square 4 x 4 images at input side 4: the eval transform is the identity, so the counts are the masks'."""
    truth, pred = np.zeros((3, 4, 4), bool), np.zeros((3, 4, 4), bool)
    truth[0, :2, :2], pred[0, :2] = True, True            # I 4, U 8: IoU 0.5 (counts at 0.5: LAVT's >=)
    truth[1], pred[1, :3] = True, True                    # I 12, U 16: IoU 0.75
    truth[2, 3, 3] = True                                 # empty prediction: I 0, U 1
    boxes = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.125, 0.125, 0.25, 0.25]])  # cxcywh
    values = segmentation_metric({"seg_map": logits_of(pred)[:, None], "pred_box": boxes},
                                 {"obj_masks": torch.zeros(3, 4, 4), "original_masks": list(truth)})
    assert values["mask_iou"].tolist() == [0.5, 0.75, 0.0]
    assert values["mask_intersection"].tolist() == [4, 12, 0] and values["mask_union"].tolist() == [8, 16, 1]
    assert values["box_mask_iou"].tolist() == [1.0, 1.0, 0.0]      # boxes filled: the first two are their truth
    metrics = segmentation_summary(means_of(values))
    assert metrics["mask_miou"] == pytest.approx(1.25 / 3) and metrics["mask_oiou"] == pytest.approx(16 / 25)
    precisions = [metrics[f"mask_prec@{t}"] for t in (0.5, 0.6, 0.7, 0.8, 0.9)]
    assert precisions == pytest.approx([2 / 3, 1 / 3, 1 / 3, 0, 0])
    assert metrics["box_mask_miou"] == pytest.approx(2 / 3)
    precision_keys = {f"mask_prec@{t}" for t in (0.5, 0.6, 0.7, 0.8, 0.9)}
    assert set(metrics) == {"mask_miou", "mask_oiou", "box_mask_miou"} | precision_keys


@pytest.mark.parametrize("size_wh", [(200, 120), (90, 160)])
def test_a_mask_over_the_object_in_the_input_lands_on_the_object_in_the_original(size_wh):
    """The object's polygon placed in the eval transform's input (scaled, shifted by the centred padding) and filled
    there, read as the head's logits and drawn back on the original image: it covers the object, centred on it
    within a pixel, and stays inside the image; the same mask mirrored misses it."""
    w, h = size_wh
    polygon = np.array([0.2 * w, 0.9 * h, 0.55 * w, 0.15 * h, 0.85 * w, 0.8 * h])
    truth = polygons_to_mask([polygon], h, w)
    letterbox = Letterbox.of(w, h, 64)
    framed = polygons_to_mask([polygon * letterbox.ratio + np.tile([letterbox.left, letterbox.top], 3)], 64, 64)
    targets = {"obj_masks": torch.zeros(1, 64, 64), "original_masks": [truth]}
    box = torch.tensor([[0.5, 0.5, 0.1, 0.1]])
    values = segmentation_metric({"seg_map": logits_of(framed)[None, None], "pred_box": box}, targets)
    assert values["mask_iou"].item() > 0.93
    drawn = letterbox.mask_to_original(logits_of(framed))
    assert drawn.shape == (h, w)
    (ys, xs), (yt, xt) = np.nonzero(drawn), np.nonzero(truth)
    assert abs(xs.mean() - xt.mean()) < 1 and abs(ys.mean() - yt.mean()) < 1
    mirrored = framed[:, ::-1].copy()
    mirrored = segmentation_metric({"seg_map": logits_of(mirrored)[None, None], "pred_box": box}, targets)
    assert mirrored["mask_iou"].item() < 0.6


def test_polygon_masks_stay_inside_the_image():
    mask = polygons_to_mask([[-20, -20, 50, -20, 50, 30, -20, 30]], 10, 40)    # past the top-left corner
    assert mask.shape == (10, 40) and mask.all()               # the whole image, nothing outside it
    assert polygons_to_mask([[1, 1, 3, 1]], 5, 5).sum() == 0   # two points cover nothing (not read as a box)


def test_a_polygon_list_that_is_not_one_names_the_split_file_and_entry(tmp_path):
    write_layout(tmp_path, "unc")
    good = coco_entry("COCO_train2014_val000000.jpg")
    path = os.path.join(tmp_path, "unc", "unc_val.pth")
    torch.save([good, good[:4] + ([[10.0, 20.0, 30.0]],)], path)           # odd number of coordinates
    ds = build_dataset("val", args_for("unc", tmp_path, use_seg_mask=True))
    assert ds[0].original_mask.shape == (480, 640)                        # kept by evaluation splits
    with pytest.raises(UserError, match=rf"split file {path}, entry 1\) is not a COCO polygon list.*fix that entry"):
        ds[1]
