"""The verify tool finds planted missing/corrupt images and train/eval leakage, and dumps samples."""
import json
import os

import torch

from datasets.refer import IMAGE_DIRS
from datasets.verify import main
from tests.data_helpers import TARGET_XYWH, write_layout


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_clean_dataset_passes(tmp_path, capsys):
    write_layout(tmp_path, "unc", splits=("train", "val", "testA"))
    code, out, _ = run(capsys, "--dataset", "unc", "--data_root", str(tmp_path), "--split_root", str(tmp_path))
    assert code == 0 and out.rstrip().endswith("OK")
    assert "train: 3 samples, 3 images, 0 zero-area boxes, 0 phrases over 77 tokens" in out
    assert "testB: no split file" in out


def test_planted_missing_and_corrupt_images(tmp_path, capsys):
    write_layout(tmp_path, "flickr", splits=("train", "test"))
    folder = os.path.join(tmp_path, IMAGE_DIRS["flickr"])
    os.remove(os.path.join(folder, "train1.jpg"))
    os.remove(os.path.join(folder, "test2.jpg"))
    with open(os.path.join(folder, "test0.jpg"), "wb") as f:
        f.write(b"garbage")
    code, out, _ = run(capsys, "--dataset", "flickr", "--data_root", str(tmp_path), "--split_root", str(tmp_path))
    assert code == 1 and out.rstrip().endswith("FAILED")
    assert f"image {os.path.join(folder, 'train1.jpg')}: missing" in out
    assert f"image {os.path.join(folder, 'test2.jpg')}: missing" in out
    assert f"image {os.path.join(folder, 'test0.jpg')}: unreadable" in out
    assert "images: 3 problems" in out
    code, out, _ = run(capsys, "--dataset", "flickr", "--data_root", str(tmp_path), "--split_root", str(tmp_path),
                       "--split", "train")
    assert code == 1 and "images: 1 problems" in out


def test_degenerate_boxes_counted_and_bad_split_file_reported(tmp_path, capsys):
    write_layout(tmp_path, "unc", splits=("train", "val"))
    data = torch.load(tmp_path / "unc" / "unc_train.pth", weights_only=True)
    data[0] = data[0][:2] + ([10.0, 10.0, 0.5, 30.0],) + data[0][3:]
    torch.save(data, tmp_path / "unc" / "unc_train.pth")
    (tmp_path / "unc" / "unc_val.pth").write_bytes(b"junk")
    code, out, _ = run(capsys, "--dataset", "unc", "--data_root", str(tmp_path), "--split_root", str(tmp_path))
    assert "train: 3 samples, 3 images, 1 zero-area boxes" in out
    assert code == 1 and "val: ERROR split file" in out


def test_mixup_leakage_found(tmp_path, capsys):
    write_layout(tmp_path, "mixup", splits=("train", "val", "test"))
    write_layout(tmp_path, "unc", splits=("val",))
    argv = ("--dataset", "mixup", "--data_root", str(tmp_path), "--split_root", str(tmp_path))
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "leakage: none" in out
    unc_val = torch.load(tmp_path / "unc" / "unc_val.pth", weights_only=True)
    mixup_train = torch.load(tmp_path / "mixup" / "mixup_train.pth", weights_only=True)
    torch.save(mixup_train + [unc_val[1]], tmp_path / "mixup" / "mixup_train.pth")
    flickr_test = mixup_train[1:2]                 # a Flickr image of mixup train, planted in flickr test
    os.makedirs(tmp_path / "flickr", exist_ok=True)
    torch.save([(flickr_test[0][0], [0, 0, 10, 10], "x")], tmp_path / "flickr" / "flickr_test.pth")
    code, out, _ = run(capsys, *argv)
    assert code == 1 and "leakage: FOUND" in out
    assert f"1 mixup train images appear in unc val, e.g. {IMAGE_DIRS['coco']}/{unc_val[1][0]}" in out
    assert f"appear in flickr test, e.g. {IMAGE_DIRS['flickr']}/{flickr_test[0][0]}" in out


def test_dump_prints_eval_samples(tmp_path, capsys):
    write_layout(tmp_path, "referit", splits=("train", "val", "test"))
    code, out, err = run(capsys, "--dataset", "referit", "--data_root", str(tmp_path), "--split_root",
                         str(tmp_path), "--split", "test", "--dump", "2", "--imsize", "224")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == 2 and "OK" in err
    ratio = 224 / 640
    top = round((224 - 480 * ratio) / 2 - 0.1)
    x0, y0, x1, y1 = (int(v) for v in (TARGET_XYWH[0], TARGET_XYWH[1], TARGET_XYWH[0] + TARGET_XYWH[2],
                                        TARGET_XYWH[1] + TARGET_XYWH[3]))
    assert lines[0]["image"] == "test0.jpg" and lines[0]["phrase"] == "the red box" and lines[0]["imsize"] == 224
    expected = [x0 * ratio, y0 * ratio + top, x1 * ratio, y1 * ratio + top]
    assert all(abs(a - b) < 0.01 for a, b in zip(lines[0]["box_xyxy"], expected))


def test_boxes_outside_the_image_reported(tmp_path, capsys):
    """Partly outside: counted (training clips them); wholly outside: an error naming the split file."""
    write_layout(tmp_path, "referit", splits=("train", "val"))     # referit: the size comes from the image
    train_file = tmp_path / "referit" / "referit_train.pth"
    data = torch.load(train_file, weights_only=True)
    data[0] = data[0][:2] + ([-20, 10, 100, 50],) + data[0][3:]
    torch.save(data, train_file)
    argv = ("--dataset", "referit", "--data_root", str(tmp_path), "--split_root", str(tmp_path))
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out.rstrip().endswith("OK")
    assert "train: 3 samples, 3 images, 0 zero-area boxes, 0 phrases over 77 tokens, 1 boxes partly outside " \
           "the image (clipped), 0 wholly outside" in out
    data[2] = data[2][:2] + ([1000, 10, 1100, 50],) + data[2][3:]
    torch.save(data, train_file)
    code, out, _ = run(capsys, *argv)
    assert code == 1 and out.rstrip().endswith("FAILED")
    assert "1 boxes partly outside the image (clipped), 1 wholly outside" in out
    assert f"train: ERROR 1 boxes lie wholly outside their image in {train_file} (samples 2)" in out


def test_data_root_or_split_root_not_a_folder_fails(tmp_path, capsys):
    """Training refuses both; so does verify, one line each."""
    write_layout(tmp_path, "unc", splits=("train", "val"))
    missing = tmp_path / "nowhere"
    code, out, _ = run(capsys, "--dataset", "unc", "--data_root", str(missing), "--split_root", str(missing))
    assert code == 1 and out.splitlines() == [
        f"ERROR --data_root {missing} is not a folder; set it to the folder that holds the image folders (other/, "
        "referit/, Flickr30k/, synthref/)",
        f"ERROR --split_root {missing} is not a folder; set it to the folder that holds <dataset>/<dataset>_<split>.pth",
        "FAILED"]
    code, out, _ = run(capsys, "--dataset", "unc", "--data_root", str(missing), "--split_root", str(tmp_path))
    assert code == 1 and f"ERROR --data_root {missing} is not a folder" in out and "--split_root" not in out
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, _ = run(capsys, "--dataset", "unc", "--data_root", str(empty), "--split_root", str(tmp_path))
    assert code == 1 and f"image {empty / IMAGE_DIRS['coco']}: image folder not found; set --data_root" in out
    assert "images: 1 problems" in out


def test_size_entry_that_disagrees_with_its_image_fails(tmp_path, capsys):
    """Every entry's size is checked (as training checks each sample), not only the first entry of an image."""
    write_layout(tmp_path, "unc", splits=("train", "val"))
    val_file = tmp_path / "unc" / "unc_val.pth"
    data = torch.load(val_file, weights_only=True)
    data.append((data[0][0], {"height": 999, "width": 999}) + data[0][2:])    # a second expression, wrong size
    torch.save(data, val_file)
    code, out, _ = run(capsys, "--dataset", "unc", "--data_root", str(tmp_path), "--split_root", str(tmp_path))
    image = os.path.join(tmp_path, IMAGE_DIRS["coco"], data[0][0])
    assert code == 1 and f"image {image}: size 640x480 differs from the split file's 999x999" in out
    assert out.rstrip().endswith("FAILED")


def test_missing_val_or_training_split_fails(tmp_path, capsys):
    write_layout(tmp_path, "unc", splits=("train", "testA"))
    argv = ("--dataset", "unc", "--data_root", str(tmp_path), "--split_root", str(tmp_path))
    code, out, _ = run(capsys, *argv)
    val_file = os.path.join(tmp_path, "unc", "unc_val.pth")
    assert code == 1 and f"val: ERROR no split file ({val_file}); training validates on it" in out
    assert "testB: no split file" in out and "testB: ERROR" not in out
    write_layout(tmp_path, "unc", splits=("val",))
    os.remove(tmp_path / "unc" / "unc_train.pth")
    code, out, _ = run(capsys, *argv)
    assert code == 1 and f"ERROR no training split (train or train_pseudo) under --split_root {tmp_path}" in out
    torch.save(torch.load(tmp_path / "unc" / "unc_val.pth", weights_only=True), tmp_path / "unc" / "unc_train_pseudo.pth")
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out.rstrip().endswith("OK")


def test_empty_expressions_reported_with_their_entries(tmp_path, capsys):
    """Kept by training (as the official loader), so verify passes, but names each one."""
    write_layout(tmp_path, "unc", splits=("train", "val"))
    train_file = tmp_path / "unc" / "unc_train.pth"
    data = torch.load(train_file, weights_only=True)
    data[1] = data[1][:3] + (" ",) + data[1][4:]
    torch.save(data, train_file)
    code, out, _ = run(capsys, "--dataset", "unc", "--data_root", str(tmp_path), "--split_root", str(tmp_path))
    assert code == 0 and "train: 3 samples, 3 images, 0 zero-area boxes" in out and "1 empty expressions" in out
    assert f"train: warning: 1 empty expressions in {train_file} (entries 1); training and evaluation keep them" in out


def test_image_path_outside_the_image_folder_fails_unless_allowed(tmp_path, capsys):
    write_layout(tmp_path, "flickr", splits=("train", "val"))
    val_file = tmp_path / "flickr" / "flickr_val.pth"
    data = torch.load(val_file, weights_only=True)
    data[2] = ("../" + data[2][0],) + data[2][1:]
    os.rename(os.path.join(tmp_path, IMAGE_DIRS["flickr"], data[2][0][3:]), tmp_path / "Flickr30k" / data[2][0][3:])
    torch.save(data, val_file)
    argv = ("--dataset", "flickr", "--data_root", str(tmp_path), "--split_root", str(tmp_path))
    code, out, _ = run(capsys, *argv)
    assert code == 1 and f"val: ERROR split file {val_file}, entry 2: the image path '../val2.jpg' leads outside" in out
    code, out, _ = run(capsys, *argv, "--allow_outside_paths")
    assert code == 0 and "val: 3 samples, 3 images" in out and out.rstrip().endswith("OK")
