"""python -m datasets.convert: round trips through JSONL on every split-file layout, the refer toolkit's
annotations, the synthetic set trained from JSONL as from its split files, the recipe for one's own data, and the
README's "Train on your own data" commands as written."""
import json
import pickle
import re
import shlex
import subprocess

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

import eval as eval_tool
import train_hivg
from datasets import synthetic
from datasets.convert import main as convert
from datasets.formats.fields import boxes_from_xywh
from datasets.refer import GroundingDataset, load_refs
from tests.conftest import REPO, flags
from tests.data_helpers import write_layout


@pytest.mark.parametrize("dataset", ["unc", "referit", "flickr", "mixup"])
def test_split_files_to_jsonl_and_back_give_the_same_samples(tmp_path, dataset):
    root = tmp_path / "authors"
    write_layout(root, dataset, splits=("train", "val"), n=2, triangle=True)
    assert convert(["to-jsonl", "--dataset", dataset, "--split_root", str(root), "--out", str(tmp_path / "j")]) == 0
    assert convert(["to-split-files", "--jsonl", str(tmp_path / "j"), "--dataset", dataset,
                    "--out", str(tmp_path / "back")]) == 0
    for split in ("train", "val"):
        before, after = load_refs(str(root), dataset, split), load_refs(str(tmp_path / "back"), dataset, split)
        via_jsonl = load_refs(str(tmp_path / "j"), "jsonl", split)
        assert len(before) == len(after) == len(via_jsonl) == (6 if dataset == "mixup" else 2)
        assert [r._replace(source="") for r in before] == [r._replace(source="") for r in after]
        # trained from the JSONL files directly: the same float boxes, phrases and masks (mixup: image paths keep
        # their folder, so --data_root stays the authors'); the integer box by the COCO sets' rule, which for a
        # fractional [x0, y0, x1, y1] box of the ReferIt and Flickr layouts may end one pixel further
        assert [(r.box_xywh, r.phrase, r.polygons) for r in before] == \
            [(r.box_xywh, r.phrase, r.polygons) for r in via_jsonl]
        assert [boxes_from_xywh(r.box_xywh)[0] for r in before] == [r.box_xyxy for r in via_jsonl]
        if dataset in ("unc", "mixup"):
            assert [r.box_xyxy for r in before] == [r.box_xyxy for r in via_jsonl]
        if dataset == "mixup":
            assert {r.image.split("/")[0] for r in via_jsonl} == {"other", "Flickr30k", "referit"}


def coco_floats_round_trip(tmp_path):
    """COCO [x, y, w, h] floats whose x + w is inexact in binary floats survive the round trip bit for bit."""
    boxes = [[0.1, 0.7, 3.0, 2.2], [103.93, 299.99, 134.22, 177.42], [1e-7, 5.5, 0.30000000000000004, 1.0]]
    (tmp_path / "unc").mkdir()
    torch.save([(f"{i}.jpg", {"height": 480, "width": 640}, box, "x", [[0.0, 0.0, 1.0, 0.0, 1.0, 1.0]])
                for i, box in enumerate(boxes)], tmp_path / "unc" / "unc_train.pth")
    convert(["to-jsonl", "--dataset", "unc", "--split_root", str(tmp_path), "--split", "train", "--out",
             str(tmp_path / "j")])
    return boxes, load_refs(str(tmp_path / "j"), "jsonl", "train")


def test_coco_boxes_keep_their_floats_and_truncation_through_jsonl(tmp_path):
    boxes, refs = coco_floats_round_trip(tmp_path)
    assert [list(r.box_xywh) for r in refs] == boxes
    assert [r.box_xyxy for r in refs] == [boxes_from_xywh(tuple(b))[0] for b in boxes]
    assert refs[0].box_xyxy == (0, 0, 3, 2)       # 0 + int(3.0): x + w - x would give 2.9999999999999996


def write_refer(folder):
    """refs(unc).p and instances.json in the refer toolkit's layout: 4 refs, 7 sentences, one crowd RLE."""
    rle = coco_mask.encode(np.asfortranarray(np.pad(np.ones((10, 12), np.uint8), ((5, 33), (7, 45)))))
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": 48, "width": 64} for i in (1, 2)]
    anns = [{"id": 10, "image_id": 1, "bbox": [10.5, 8.25, 30.1, 20.3], "category_id": 1, "iscrowd": 0,
             "segmentation": [[10.5, 8.25, 40.6, 8.25, 40.6, 28.55]]},
            {"id": 11, "image_id": 2, "bbox": [7.0, 5.0, 12.0, 10.0], "category_id": 1, "iscrowd": 1,
             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}]
    refs = []
    for ref_id, (ann, split, n) in enumerate([(anns[0], "train", 3), (anns[1], "val", 1), (anns[0], "testA", 2),
                                               (anns[1], "testB", 1)]):
        sents = [{"sent": f"thing {ref_id} {k}", "raw": f"Thing {ref_id} {k}.", "tokens": ["thing"],
                  "sent_id": 10 * ref_id + k} for k in range(n)]
        refs.append({"ref_id": ref_id, "ann_id": ann["id"], "image_id": ann["image_id"], "split": split,
                     "sentences": sents, "file_name": f"COCO_train2014_{ann['image_id']:012d}_{ann['id']}.jpg",
                     "category_id": 1, "sent_ids": [s["sent_id"] for s in sents]})
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)   # as the toolkit's Python 2 files
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                       "categories": [{"id": 1, "name": "thing"}]}))
    return anns


def test_refer_toolkit_annotations_to_jsonl(tmp_path, capsys):
    anns = write_refer(tmp_path)
    assert convert(["refer", "--refs", str(tmp_path / "refs(unc).p"), "--instances", str(tmp_path / "instances.json"),
                    "--out", str(tmp_path / "j")]) == 0
    assert capsys.readouterr().out.splitlines() == ["train: 3 lines", "val: 1 lines", "testA: 2 lines",
                                                    "testB: 1 lines"]
    train, val = load_refs(str(tmp_path / "j"), "jsonl", "train"), load_refs(str(tmp_path / "j"), "jsonl", "val")
    assert [r.phrase for r in train] == ["thing 0 0", "thing 0 1", "thing 0 2"] and train[2].sample_id == 2
    assert train[0].image == "COCO_train2014_000000000001.jpg" and train[0].size_hw == (48, 64)
    assert list(train[0].box_xywh) == anns[0]["bbox"] and train[0].box_xyxy == (10, 8, 40, 28)
    assert train[0].polygons == anns[0]["segmentation"]
    mask = GroundingDataset(val, "", transform=None, use_seg_mask=True).object_mask(val[0], 48, 64)
    assert mask.sum() == 120 and mask[5:15, 7:19].all()
    (tmp_path / "evil.p").write_bytes(pickle.dumps([print]))
    assert convert(["refer", "--refs", str(tmp_path / "evil.p"), "--instances", str(tmp_path / "instances.json"),
                    "--out", str(tmp_path / "k")]) == 2
    assert "--allow_unsafe_pickle" in capsys.readouterr().err


@pytest.mark.recorded
def test_synthetic_set_trains_to_the_same_weights_from_jsonl(small_data, tmp_path):
    assert convert(["to-jsonl", "--dataset", "synthref", "--split_root", str(small_data),
                    "--out", str(tmp_path / "j")]) == 0
    short = ("--epochs", "2", "--epoch_samples", "8", "--vl_dim_feedforward", "64")   # two steps, a small fusion
    from_jsonl = flags(small_data / "synthref" / "images", tmp_path / "b", *short)
    from_jsonl[from_jsonl.index("synthref")] = "jsonl"
    from_jsonl[from_jsonl.index("--split_root") + 1] = str(tmp_path / "j")
    assert train_hivg.main(flags(small_data, tmp_path / "a", *short)) == 0
    assert train_hivg.main(from_jsonl) == 0
    a, b = (torch.load(tmp_path / run / "checkpoint.pth", weights_only=True)["model"] for run in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_custom_recipe_trains_every_stage_and_evaluates_every_split(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "NGPU": "1", "OUTPUT_ROOT": str(tmp_path), "SPLIT_ROOT": "mine",
           "DATA_ROOT": "images", "TEXT_LAYERS": "all"}
    proc = subprocess.run(["bash", str(REPO / "train_and_eval_script" / "train_eval_custom.sh")], env=env,
                          capture_output=True, text=True, check=True)
    runs = [line for line in proc.stdout.splitlines() if line.startswith("torchrun")]
    assert len(runs) == 8 and "--dataset jsonl --data_root images --split_root mine" in runs[0]
    assert "--text_layers all" in runs[0] and "--epochs 60" in runs[0] and "--epochs 20" in runs[3]
    assert all(run.endswith("--dataset jsonl --eval_set all") for run in runs[4:])


def readme_commands() -> list:
    """The commands of the README's run on a small synthetic set, as argument lists."""
    section = (REPO / "README.md").read_text().split("## Train on your own data")[1].split("\n## ")[0]
    block = re.search(r"tests/test_jsonl_convert\.py\):\n\n```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(command) for command in block.replace("\\\n", " ").splitlines()]


def test_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    tools = {("-m", "datasets.synthetic"): synthetic.main, ("-m", "datasets.convert"): convert,
             ("train_hivg.py",): train_hivg.main, ("eval.py",): eval_tool.main}
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert [c[0] for c in commands] == ["python"] * 4
    for words in commands:
        name = tuple(words[1:3]) if words[1] == "-m" else (words[1],)
        assert tools[name](words[1 + len(name):]) in (0, None), words
    results = json.loads((tmp_path / "outputs" / "example" / "eval_best_checkpoint.json").read_text())
    assert sorted(results["jsonl"]) == ["test", "val"] and results["jsonl"]["test"]["count"] == 4
    assert "val: 4 lines" in capsys.readouterr().out
