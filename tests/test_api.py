"""The Python API (models/api.py): letterbox geometry, LoRA merged, batch independence, box scores, heat maps."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_convert

from datasets.masks import box_to_mask
from datasets.tokens import tokenize
from datasets.transforms import Letterbox, Record, make_transforms
from models.api import prepare
from models.head_losses import token_alignment_target
from models.heads import box_score
from models.hivg import patch_padding_mask
from tests.data_helpers import draw_scene

# non-square sizes (w, h), odd and even pads, both orientations, one smaller than the input side
SIZES = [(640, 480), (480, 640), (333, 101), (101, 333), (65, 17), (17, 65), (50, 30), (64, 64), (1000, 251)]


@pytest.mark.parametrize("size_wh", SIZES)
def test_letterbox_is_the_eval_transform_and_inverts_it(size_wh):
    w, h = size_wh
    S = 64
    box = torch.tensor([0.13 * w, 0.27 * h, 0.81 * w, 0.94 * h])
    record = make_transforms(S, train=False)(Record(Image.new("RGB", (w, h)), box.clone(), "x",
                                                    np.zeros((h, w), bool)))
    lb = Letterbox.of(w, h, S)
    x0, y0, x1, y1 = lb.crop_box
    expected_mask = np.ones((S, S), np.int32)
    expected_mask[y0:y1, x0:x1] = 0
    assert np.array_equal(record.pixel_mask.numpy(), expected_mask), (size_wh, lb)
    padded = box.double() * lb.ratio + torch.tensor([x0, y0, x0, y0], dtype=torch.float64)   # the forward map
    assert torch.allclose((box_convert(padded, "xyxy", "cxcywh") / S).float(), record.box, atol=1e-6)
    back = lb.to_original(record.box, clip=False)
    assert torch.allclose(back, box.double(), atol=2e-3), (back, box)


def test_boxes_outside_the_image_are_clipped_to_it():
    lb = Letterbox.of(200, 100, 64)                       # padding above and below
    full = torch.tensor([0.5, 0.5, 1.0, 1.0])                 # the whole padded frame
    assert lb.to_original(full).tolist() == [0.0, 0.0, 200.0, 100.0]



@pytest.mark.recorded
def test_lora_is_merged_and_the_function_unchanged(tiny, tiny_loaded):
    _, model = tiny
    assert not any("lora" in k for k in tiny_loaded.state_dict())
    assert any("lora" in k for k in model.state_dict())
    assert not tiny_loaded.training
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.int32)
    mask[1, :, 50:] = 1
    ids = tokenize(["left dog", "the red ball on the table"], model.context_length)
    with torch.no_grad():
        a = model(x, mask, ids, outputs=["box", "reg_attention"])
        b = tiny_loaded(x, mask, ids, outputs=["box", "reg_attention"])
    assert torch.allclose(a["pred_box"], b["pred_box"], atol=1e-5)
    assert torch.allclose(a["reg_attention"], b["reg_attention"], atol=1e-5)


@pytest.mark.recorded
def test_predictions_do_not_depend_on_the_batch(grounder):
    p = [prepare(Image.fromarray(np.full((40 + 10 * i, 64, 3), 30 * i, np.uint8)), 64) for i in range(3)]
    texts = ["one", "the second thing", "three"]
    together = grounder.ground_prepared(p, texts, heatmap=True)
    for i in range(3):
        alone = grounder.ground_prepared([p[i]], [texts[i]], heatmap=True)[0]
        assert np.allclose(alone.box_xyxy, together[i].box_xyxy, atol=1e-4)
        assert np.allclose(alone.attention, together[i].attention, atol=1e-5)


def test_ground_leaves_its_image_unchanged_and_decodes_it_fully(grounder, tmp_path):
    """One Image.open JPEG grounded twice: the same boxes both times, its size untouched, and the input the
    eval transform of the fully decoded image (the authors' pixels)."""
    draw_scene(str(tmp_path / "a.jpg"))                        # 640 x 480
    img = Image.open(tmp_path / "a.jpg")
    first, second = grounder.ground([img, img], ["the red box", "the red box"])
    assert img.size == (640, 480)
    assert second.box_xyxy == pytest.approx(first.box_xyxy, abs=1e-4)
    full = prepare(Image.open(tmp_path / "a.jpg").convert("RGB"), 64)
    assert torch.equal(prepare(img, 64).image, full.image)


def test_score_is_the_mean_alignment_probability_inside_the_box():
    logits = torch.full((2, 16), -20.0)            # 4 x 4 grid of 16-pixel patches, probability ~0 everywhere ...
    logits[0, [5, 6, 9, 10]] = 20.0                 # ... but ~1 on the 2 x 2 centre patches of sample 0
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5],     # covers exactly the centre patches
                          [0.1, 0.1, 0.01, 0.01]])  # no patch inside: the patch under the box centre
    scores = box_score(logits, boxes, (4, 4), 64)
    assert torch.allclose(scores, torch.tensor([1.0, 0.0]), atol=1e-6)
    logits[1, 0] = 0.0
    assert abs(box_score(logits, boxes, (4, 4), 64)[1].item() - 0.5) < 1e-6


def test_a_token_map_equal_to_its_box_target_scores_one():
    """The score reads the patches the token-alignment target marks for the box: logits that are the target of a
    box score 1 on that box, wherever its edges fall within the patches (patch centres would miss some)."""
    side, size = 8, 64
    gen = torch.Generator().manual_seed(0)
    corners = torch.rand(300, 2, 2, generator=gen) * size
    lo, hi = corners.min(dim=1).values, corners.max(dim=1).values
    xywh = torch.cat([lo, hi - lo], dim=1)
    masks = torch.from_numpy(np.stack([box_to_mask(b.tolist(), size, size) for b in xywh]))
    target = token_alignment_target(masks, side)
    marked = target.sum(dim=1) > 0
    scores = box_score(target * 40 - 20, box_convert(xywh, "xywh", "cxcywh") / size, (side, side), size)
    assert marked.sum() > 150 and torch.all(scores[marked] > 1 - 1e-6)



def test_heatmap_has_the_grid_shape_sums_to_one_and_ignores_padding(grounder, tiny_loaded):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 64, 3), dtype=np.uint8))  # 64 x 20
    preds = grounder.ground([img, img.copy()], ["the left one", "a thing"], heatmap=True, token_map=True)
    prep = prepare(Image.fromarray(np.zeros((20, 64, 3), np.uint8)), 64)
    padding = patch_padding_mask(prep.pixel_mask[None], tiny_loaded.grid)[0].reshape(tiny_loaded.grid).numpy()
    assert padding.any() and not padding.all()
    for p in preds:
        assert p.attention.shape == tiny_loaded.grid == (8, 8)
        assert p.token_map.shape == tiny_loaded.grid
        assert abs(float(p.attention.sum()) - 1.0) < 1e-5 and (p.attention >= 0).all()
        assert np.all(p.attention[padding] == 0)


def test_attention_is_computed_only_when_asked(grounder, tiny_loaded, monkeypatch):
    layer = tiny_loaded.fusion.layers[-1]
    calls = []
    original = layer.reg_attention
    monkeypatch.setattr(layer, "reg_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    img = Image.new("RGB", (64, 40), (10, 20, 30))
    plain = grounder.ground([img.copy()], ["a"])[0]
    assert calls == [] and plain.attention is None and plain.token_map is None
    with_heat = grounder.ground([img.copy()], ["a"], heatmap=True)[0]
    assert calls == [1] and with_heat.attention is not None and with_heat.token_map is None


