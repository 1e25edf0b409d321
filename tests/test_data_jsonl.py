"""JSONL datasets of one's own (README "Train on your own data"): box semantics, every bad-input kind stopping
train_hivg.py with one `file:line` line, datasets.verify listing them all, and a set of the test's own images
trained for one epoch and evaluated on every split."""
import json
from pathlib import Path

import pytest
import torch

import eval as eval_tool
import train_hivg
from datasets.formats.fields import Where
from datasets.formats.jsonl import Line, parse
from datasets.refer import load_refs
from datasets.verify import main as verify
from models.config import select_text_layers
from tests.conftest import flags
from tests.data_helpers import draw_scene
from utils import paper_table

SIZE_WH = (64, 48)
TARGET = (10.5, 8.25, 30, 20)    # x, y, w, h in pixels of a 64 x 48 image


def line(image, text="the red box", box=None, **optional):
    x, y, w, h = TARGET
    return json.dumps({"image": image, "box": box or [x, y, x + w, y + h], "text": text, **optional})


def write_own_set(root: Path, counts=(("train", 4), ("val", 2), ("test", 2), ("hard", 2))) -> tuple:
    """(images folder, JSONL folder) of a set drawn here: <split>.jsonl with one line per image."""
    images, splits = root / "images", root / "jsonl"
    splits.mkdir(parents=True)
    for split, n in counts:
        names = [f"{split}/{i}.png" for i in range(n)]
        for name in names:
            draw_scene(str(images / name), size_wh=SIZE_WH, target=TARGET)
        (splits / f"{split}.jsonl").write_text("".join(line(name, id=i) + "\n" for i, name in enumerate(names)))
    return images, splits


def jsonl_flags(images, splits, out, *extra):
    """The tiny model's short-run flags of tests.conftest on a JSONL set."""
    words = flags(images, out, "--batch_size", "4", "--epochs", "1", "--vl_dim_feedforward", "64", *extra)
    words[words.index("synthref")] = "jsonl"
    words[words.index("--split_root") + 1] = str(splits)
    return words


def test_box_is_truncated_as_the_coco_sets_from_the_numbers_as_written():
    def ref(box):
        return parse(Line(1, json.dumps({"image": "a.png", "box": box, "text": "x"})),
                     Where(dataset="jsonl", folder="jsonl", source="s.jsonl", index=0))
    # x0' = int(x0), x1' = x0' + int(x1 - x0): 1 + int(2.5), 2 + int(3.7)
    assert ref([1.7, 2.2, 4.2, 5.9]).box_xyxy == (1, 2, 3, 5)
    assert ref([3, 4, 10, 20]).box_xyxy == (3, 4, 10, 20)             # integer boxes: as written
    # 0.1 + 0.2 is 0.30000000000000004 in binary floats: the width is read exactly from the written numbers
    assert ref([0.1, 0.1, 0.3, 0.3]).box_xywh == (0.1, 0.1, 0.2, 0.2)
    assert ref([0.1, 0.1, 3.1, 3.1]).box_xyxy == (0, 0, 3, 3)


BAD_LINES = {   # kind -> (line 2 of train.jsonl, what the message says after "file:2: ")
    "not JSON": ('{"image": "train/1.png", "box": [1, 2, 30, 40], "text": "x"', "not JSON"),
    "not an object": ('["train/1.png", [1, 2, 30, 40], "x"]', "a list where a JSON object belongs"),
    "missing key": ('{"image": "train/1.png", "box": [1, 2, 30, 40]}', "missing key 'text'"),
    "unknown key": ('{"image": "train/1.png", "bbox": [1, 2, 30, 40], "box": [1, 2, 30, 40], "text": "x"}',
                    "unknown key bbox"),
    "box of three": (line("train/1.png", box=[1, 2, 30]), "'box' must be four numbers [x0, y0, x1, y1]"),
    "box of strings": (line("train/1.png", box=["1", "2", "30", "40"]), "'box' must be four numbers"),
    "x1 <= x0": (line("train/1.png", box=[30, 2, 10, 40]), "has x1 <= x0 or y1 <= y0"),
    "box outside": (line("train/1.png", box=[100, 60, 120, 80]), "the box lies wholly outside image"),
    "missing image": (line("train/9.png"), "train/9.png not found; put it under --data_root"),
    "empty text": (line("train/1.png", text="  "), "'text' is empty"),
    "duplicate id": (line("train/1.png", id=0), "id 0 is on line 1 too"),
    "mask": (line("train/1.png", mask=[1, 2, 3, 4, 5, 6]), "'mask' must be COCO polygons"),
    "size": (line("train/1.png", width=640, height=480), "width/height 640x480 differs from image"),
}


@pytest.mark.parametrize("kind", BAD_LINES)
def test_bad_input_stops_training_with_one_line_naming_file_and_line(tmp_path, kind, capsys):
    images, splits = write_own_set(tmp_path, counts=(("train", 2), ("val", 1)))
    train = splits / "train.jsonl"
    first = train.read_text().splitlines()[0]
    train.write_text(f"{first}\n{BAD_LINES[kind][0]}\n")
    assert train_hivg.main(jsonl_flags(images, splits, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"train_hivg.py: error: {train}:2: ") and BAD_LINES[kind][1] in err, err
    assert not (tmp_path / "out" / "log.txt").exists()


def test_verify_lists_every_bad_line(tmp_path, capsys):
    images, splits = write_own_set(tmp_path, counts=(("train", 2), ("val", 1)))
    train = splits / "train.jsonl"
    bad = [text for kind, (text, _) in BAD_LINES.items() if kind != "duplicate id"]
    train.write_text("\n".join([train.read_text().splitlines()[0], *bad, line("train/1.png", id=0)]) + "\n")
    assert verify(["--dataset", "jsonl", "--data_root", str(images), "--split_root", str(splits)]) == 1
    out = capsys.readouterr().out
    for number, (kind, (_, says)) in enumerate(BAD_LINES.items(), start=2):
        number = len(BAD_LINES) + 1 if kind == "duplicate id" else number
        assert f"train: ERROR {train}:{number}: " in out and says in out, kind
    assert out.count(f"train: ERROR {train}:") == len(BAD_LINES) and out.rstrip().endswith("FAILED")
    assert "val: 1 samples" in out and "test: no split file" in out


def test_own_images_train_one_epoch_and_evaluate_every_split(tmp_path, capsys):
    images, splits = write_own_set(tmp_path)
    assert load_refs(str(splits), "jsonl", "hard")[1].image == "hard/1.png"
    out = tmp_path / "run"
    assert train_hivg.main(jsonl_flags(images, splits, out, "--text_layers", "middle_last")) == 0
    checkpoint = torch.load(out / "best_checkpoint.pth", map_location="cpu", weights_only=True)
    layers = checkpoint["config"]["clip"]["text_cfg"]["layers"]
    assert checkpoint["config"]["text_layers"] == select_text_layers("jsonl", layers, "middle_last") != \
        select_text_layers("jsonl", layers)
    assert eval_tool.main(["--eval_model", str(out / "best_checkpoint.pth"), "--eval_set", "all",
                           "--num_workers", "0", "--batch_size", "4"]) == 0
    results = json.loads((out / "eval_best_checkpoint.json").read_text())
    assert sorted(results["jsonl"]) == ["hard", "test", "val"]
    assert [results["jsonl"][s]["count"] for s in ("val", "test", "hard")] == [2, 2, 2]
    capsys.readouterr()
    assert paper_table.main([str(out / "eval_best_checkpoint.json")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| dataset | split | Acc@0.5 |" and len(table) == 5
    assert table[2] == f"| jsonl | val | {100 * results['jsonl']['val']['acc']:.2f} |"
