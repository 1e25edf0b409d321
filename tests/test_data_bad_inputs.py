"""Bad inputs fail once, clearly, naming the file or flag and the fix; edge cases behave as documented."""
import argparse
import os
import warnings

import pytest
import torch

from datasets import Collate, add_data_args, build_dataset
from datasets.refer import IMAGE_DIRS
from datasets.synthetic import main as make_synthetic
from datasets.tokens import clip_token_count, is_truncated
from tests.data_helpers import args_for, coco_entry, draw_scene, write_layout
from utils.errors import UserError


def image_path(root, name):
    return os.path.join(root, IMAGE_DIRS["coco"], name)


def test_unknown_dataset_and_split(tmp_path):
    write_layout(tmp_path, "unc")
    with pytest.raises(ValueError, match=r"unknown dataset 'refcoco' \(--dataset\); choose one of unc, unc\+"):
        args = args_for("unc", tmp_path)
        args.dataset = "refcoco"
        build_dataset("train", args)
    with pytest.raises(ValueError, match="dataset 'unc' has no split 'test'; its splits are train, val, testA"):
        build_dataset("test", args_for("unc", tmp_path))
    with pytest.raises(SystemExit):
        add_data_args(argparse.ArgumentParser()).parse_args(["--dataset", "refcoco"])


def test_missing_split_file(tmp_path):
    write_layout(tmp_path, "unc", splits=("train",))
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("val", args_for("unc", tmp_path))
    assert os.path.join(str(tmp_path), "unc", "unc_val.pth") in str(err.value) and "--split_root" in str(err.value)
    with pytest.raises(FileNotFoundError, match="python -m datasets.synthetic --out"):
        build_dataset("train", args_for("synthref", tmp_path))


def test_empty_split_refused(tmp_path):
    write_layout(tmp_path, "unc")
    torch.save([], tmp_path / "unc" / "unc_val.pth")
    with pytest.raises(ValueError, match="unc val has no usable samples") as err:
        build_dataset("val", args_for("unc", tmp_path))
    assert "unc_val.pth" in str(err.value)


def test_missing_image_folder(tmp_path):
    write_layout(tmp_path, "unc")
    with pytest.raises(FileNotFoundError, match="set --data_root") as err:
        build_dataset("val", args_for("unc", tmp_path, data_root=str(tmp_path / "elsewhere")))
    assert IMAGE_DIRS["coco"] in str(err.value)


def test_missing_image(tmp_path):
    write_layout(tmp_path, "unc")
    ds = build_dataset("val", args_for("unc", tmp_path))
    os.remove(image_path(tmp_path, ds.refs[1].image))
    ds[0]
    with pytest.raises(UserError) as err:
        ds[1]
    assert image_path(tmp_path, ds.refs[1].image) in str(err.value) and "--data_root" in str(err.value)
    assert "datasets.verify" in str(err.value) and str(tmp_path / "unc" / "unc_val.pth") in str(err.value)


def test_corrupt_and_truncated_images(tmp_path):
    write_layout(tmp_path, "unc")
    ds = build_dataset("val", args_for("unc", tmp_path))
    garbage, truncated = image_path(tmp_path, ds.refs[0].image), image_path(tmp_path, ds.refs[1].image)
    with open(garbage, "wb") as f:
        f.write(b"not an image at all")
    raw = open(truncated, "rb").read()
    with open(truncated, "wb") as f:
        f.write(raw[:len(raw) // 3])
    for idx, path in ((0, garbage), (1, truncated)):
        with pytest.raises(UserError, match="cannot be (read|decoded)") as err:
            ds[idx]
        assert path in str(err.value) and str(tmp_path / "unc" / "unc_val.pth") in str(err.value)


def test_image_size_differs_from_split_file(tmp_path):
    write_layout(tmp_path, "unc")
    ds = build_dataset("val", args_for("unc", tmp_path))
    draw_scene(image_path(tmp_path, ds.refs[0].image), size_wh=(500, 480))
    with pytest.raises(UserError, match="is 500x480 but its split-file entry says 640x480"):
        ds[0]


def test_rle_mask_with_seg_mask(tmp_path):
    write_layout(tmp_path, "unc")
    entry = coco_entry("COCO_train2014_val000000.jpg")
    torch.save([entry[:4] + ({"size": [480, 640], "counts": "abc"},)], tmp_path / "unc" / "unc_val.pth")
    ds = build_dataset("val", args_for("unc", tmp_path, use_seg_mask=True))
    with pytest.raises(UserError, match="not a COCO polygon list.*drop --use_seg_mask"):
        ds[0]
    assert build_dataset("val", args_for("unc", tmp_path))[0].obj_mask.sum() > 0


def test_zero_area_boxes_skipped_in_training_kept_in_evaluation(tmp_path, capsys):
    """Documented behaviour: a box of zero width/height after integer truncation."""
    write_layout(tmp_path, "unc")
    good = coco_entry("COCO_train2014_train000000.jpg")
    flat = good[:2] + ([180.6, 140.2, 0.9, 160.0],) + good[3:]    # int(0.9) = 0 -> zero width
    torch.save([good, flat, flat], tmp_path / "unc" / "unc_train.pth")
    torch.save([good, flat], tmp_path / "unc" / "unc_val.pth")
    assert len(build_dataset("train", args_for("unc", tmp_path))) == 1
    assert "unc train: skipped 2 samples whose box has zero area" in capsys.readouterr().out
    val = build_dataset("val", args_for("unc", tmp_path))
    assert len(val) == 2 and "warning: 1 samples have a zero-area box (kept" in capsys.readouterr().out
    assert float(val[1].box[2]) == 0.0
    torch.save([flat], tmp_path / "unc" / "unc_train.pth")
    with pytest.raises(ValueError, match="no usable samples"):
        build_dataset("train", args_for("unc", tmp_path))


def test_long_phrase_kept_whole_and_truncated_by_the_tokenizer(tmp_path):
    """Documented behaviour: the dataset keeps the phrase; open_clip cuts it to 77 tokens ending in EOT."""
    import open_clip
    phrase = "the red box " + " ".join(["next to the very small green thing"] * 12)
    write_layout(tmp_path, "unc")
    torch.save([coco_entry("COCO_train2014_val000000.jpg", phrase=phrase.upper())], tmp_path / "unc" / "unc_val.pth")
    record = build_dataset("val", args_for("unc", tmp_path))[0]
    assert record.phrase == phrase                         # lower-cased, not shortened
    assert clip_token_count(phrase) > 77 and is_truncated(phrase)
    assert not is_truncated("the red box") and clip_token_count("the red box") == 5
    tokens = open_clip.tokenize([phrase])
    assert tokens.shape == (1, 77) and int(tokens[0, -1]) == int(tokens.max()) == 49407


def test_boxes_outside_the_image_clipped_or_skipped_and_counted(tmp_path, capsys):
    """Documented behaviour: a box partly outside its image is clipped to it; one wholly outside is handled like
    a zero-area box (skipped in training, kept in evaluation); both counted per split file."""
    write_layout(tmp_path, "unc")
    good = coco_entry("COCO_train2014_train000000.jpg")
    partly = good[:2] + ([-20.0, 400.0, 120.0, 200.0],) + good[3:]      # x from -20 to 100, y from 400 to 600
    wholly = good[:2] + ([1000.0, 10.0, 50.0, 50.0],) + good[3:]
    train_file, val_file = tmp_path / "unc" / "unc_train.pth", tmp_path / "unc" / "unc_val.pth"
    torch.save([good, partly, wholly, wholly], train_file)
    torch.save([good, partly, wholly], val_file)
    train = build_dataset("train", args_for("unc", tmp_path))
    out = capsys.readouterr().out
    assert f"unc train: warning: 1 boxes extend past their image in {train_file}; clipped to the image" in out
    assert f"unc train: skipped 2 samples whose box lies wholly outside its image in {train_file}" in out
    assert len(train) == 2
    val = build_dataset("val", args_for("unc", tmp_path))
    out = capsys.readouterr().out
    assert f"warning: 1 samples have a box wholly outside its image in {val_file} (kept" in out
    assert len(val) == 3
    assert val.refs[1].box_xyxy == (-20, 400, 100, 600)
    val.transform = lambda record: record                                     # the record before the transform
    assert val[1].box.tolist() == [0, 400, 100, 480] and val[1].obj_mask.sum() == 100 * 80
    assert val[2].box.tolist() == [640, 10, 640, 60] and val[2].obj_mask.sum() == 0


def test_zero_area_box_mask_warns_nothing(tmp_path):
    """An evaluation sample whose box has zero width after truncation: an empty mask, no numpy warning."""
    write_layout(tmp_path, "unc")
    flat = coco_entry("COCO_train2014_val000000.jpg", box=(180.0, 140.0, 0.0, 160.0))
    torch.save([flat], tmp_path / "unc" / "unc_val.pth")
    val = build_dataset("val", args_for("unc", tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert val[0].obj_mask.sum() == 0


def test_blank_expressions_kept_as_the_official_loader_does_and_named(tmp_path, capsys):
    """Documented behaviour: an empty or blank expression is kept (the official loader reads it as start and end
    of text only); training and evaluation print its split file and entry."""
    write_layout(tmp_path, "unc")
    names = [f"COCO_train2014_val{i:06d}.jpg" for i in range(3)]
    val_file = tmp_path / "unc" / "unc_val.pth"
    torch.save([coco_entry(names[0], phrase=""), coco_entry(names[1]), coco_entry(names[2], phrase="  \t")], val_file)
    val = build_dataset("val", args_for("unc", tmp_path))
    assert len(val) == 3
    assert f"unc val: warning: 2 empty expressions in {val_file} (entries 0, 2); kept" in capsys.readouterr().out
    batch = Collate(16)([val[0], val[1]])
    assert batch.ids[0, :3].tolist() == [49406, 49407, 0]       # start and end of text only


@pytest.mark.parametrize("relative", [False, True])
def test_image_paths_outside_the_image_folder_refused_unless_allowed(tmp_path, relative):
    """An absolute path, or one with '..', would read outside --data_root: refused unless --allow_outside_paths."""
    write_layout(tmp_path, "unc")
    outside = tmp_path / "elsewhere" / "outside.jpg"
    draw_scene(str(outside))
    name = os.path.relpath(outside, tmp_path / IMAGE_DIRS["coco"]) if relative else str(outside)
    val_file = tmp_path / "unc" / "unc_val.pth"
    torch.save([coco_entry("COCO_train2014_val000000.jpg"), coco_entry(name)], val_file)
    with pytest.raises(ValueError) as err:
        build_dataset("val", args_for("unc", tmp_path))
    assert f"split file {val_file}, entry 1: the image path {name!r} leads outside the image folder" in str(err.value)
    assert "--allow_outside_paths" in str(err.value)
    args = add_data_args(argparse.ArgumentParser()).parse_args(
        ["--dataset", "unc", "--data_root", str(tmp_path), "--split_root", str(tmp_path), "--allow_outside_paths"])
    val = build_dataset("val", args)
    assert os.path.samefile(val.image_path(val.refs[1]), outside) and val[1].image.shape[0] == 3


@pytest.mark.parametrize("kind", ["under a file", "read-only"])
def test_synthetic_out_folder_not_writable_one_line(tmp_path, capsys, kind):
    if kind == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "set" if kind == "under a file" else tmp_path / "ro"
    if kind == "read-only":
        out.mkdir(mode=0o555)
    with pytest.raises(SystemExit) as stop:
        make_synthetic(["--out", str(out), "--num_train", "4", "--num_val", "2", "--num_test", "2", "--workers", "1"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert f": error: --out {out} cannot be created or written (" in err and "give a folder you can write to" in err
