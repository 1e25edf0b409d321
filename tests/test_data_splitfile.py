"""Split files are read without running arbitrary code unless explicitly allowed."""
import collections
import datetime
import pickle

import numpy as np
import pytest
import torch

from datasets.refer import load_refs
from datasets.splitfile import _storage_free_pickle, load_pickled_list
from tests.conftest import Payload

ENTRY = ("COCO_train2014_000000000001.jpg", {"height": 480, "width": 640}, [1.5, 2.0, 30.0, 40.0], "the man",
         [[1.0, 2.0, 30.0, 2.0, 30.0, 40.0]])


def test_plain_types_load(tmp_path):
    torch.save([ENTRY], tmp_path / "a.pth")
    assert load_pickled_list(str(tmp_path / "a.pth")) == [ENTRY]


def test_numpy_boxes_and_scalars_load(tmp_path):
    data = [("a.jpg", "referit", np.array([1.0, 2.0, 3.0, 4.0]), "x", np.float64(3.0)),
            ("b.jpg", "flickr", np.array([1, 2, 3, 4], dtype=np.int64), "y", np.int32(7)),
            ("c.jpg", "flickr", np.array(["u", "v"]), "z", np.array([True]))]
    torch.save(data, tmp_path / "n.pth")
    loaded = load_pickled_list(str(tmp_path / "n.pth"))
    assert np.array_equal(loaded[0][2], data[0][2]) and loaded[1][2].dtype == np.int64 and loaded[0][4] == 3.0


def test_fast_path_reads_what_torch_reads_and_leaves_tensor_files_to_torch(tmp_path, monkeypatch):
    """A torch.save of plain lists (bytes and numpy included) goes through the C unpickler, not torch.load;
    a file holding tensors has storages and goes to torch's weights-only loader."""
    data = [ENTRY, ("b.jpg", b"\x00\xff raw", np.array([1.0, 2.0]), np.int64(3), {"k": (1, 2.5, None)})]
    torch.save(data, tmp_path / "plain.pth")
    torch.save([("c.jpg", torch.tensor([1.0, 2.0]))], tmp_path / "tensor.pth")
    assert _storage_free_pickle(str(tmp_path / "plain.pth")) is not None
    assert _storage_free_pickle(str(tmp_path / "tensor.pth")) is None
    expected = torch.load(tmp_path / "plain.pth", weights_only=False)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used for a storage-free file"))
    loaded = load_pickled_list(str(tmp_path / "plain.pth"))
    assert loaded[0] == ENTRY and loaded[1][1] == b"\x00\xff raw" and loaded[1][4] == {"k": (1, 2.5, None)}
    assert np.array_equal(loaded[1][2], expected[1][2]) and loaded[1][3] == 3
    monkeypatch.undo()
    assert torch.equal(load_pickled_list(str(tmp_path / "tensor.pth"))[0][1], torch.tensor([1.0, 2.0]))


def test_legacy_torch_format_with_numpy1_names(tmp_path):
    """Files from torch < 1.6 and numpy 1.x name numpy.core.multiarray; both still load."""
    data = [("a.jpg", "referit", np.array([1.0, 2.0, 3.0, 4.0]), "x", None)]
    torch.save(data, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    raw = (tmp_path / "legacy.pth").read_bytes()
    assert b"numpy._core.multiarray\n" in raw
    (tmp_path / "old.pth").write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    for name in ("legacy.pth", "old.pth"):
        assert np.array_equal(load_pickled_list(str(tmp_path / name))[0][2], data[0][2])


def test_plain_pickle_files_load(tmp_path):
    with open(tmp_path / "p.pth", "wb") as f:
        pickle.dump([ENTRY, ("a.jpg", "flickr", np.array([1.0, 2.0, 3.0, 4.0]), "x", None)], f)
    assert load_pickled_list(str(tmp_path / "p.pth"))[0] == ENTRY


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_other_globals_refused_unless_opted_in(tmp_path, writer):
    data = [("a.jpg", datetime.date(2020, 1, 1), [1, 2, 3, 4], "x", collections.Counter("ab"))]
    path = tmp_path / "evil.pth"
    if writer == "torch":
        torch.save(data, path)
    else:
        path.write_bytes(pickle.dumps(data))
    with pytest.raises(ValueError) as err:
        load_pickled_list(str(path))
    assert str(path) in str(err.value) and "--allow_unsafe_pickle" in str(err.value)
    assert load_pickled_list(str(path), allow_unsafe=True)[0][1] == datetime.date(2020, 1, 1)


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_code_execution_refused(tmp_path, writer):
    """Refused as such (by the error's type, whatever torch's wording), never reported as a damaged file."""
    path, marker = tmp_path / "boom.pth", tmp_path / "ran"
    if writer == "torch":
        torch.save([Payload(marker)], path)
    else:
        path.write_bytes(pickle.dumps([Payload(marker)]))
    refused = r"needs more than plain Python types.*\(posix\.system\).*--allow_unsafe_pickle"
    with pytest.raises(ValueError, match=refused) as err:
        load_pickled_list(str(path))
    assert str(path) in str(err.value) and "Re-download" not in str(err.value) and "weights_only" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"this is not a pickle", "not a readable pickle/torch file"),
    (b"", "is empty"),
])
def test_garbage_files(tmp_path, content, message):
    (tmp_path / "g.pth").write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        load_pickled_list(str(tmp_path / "g.pth"))
    assert str(tmp_path / "g.pth") in str(err.value)


def test_truncated_torch_file(tmp_path):
    torch.save([ENTRY] * 50, tmp_path / "t.pth")
    raw = (tmp_path / "t.pth").read_bytes()
    (tmp_path / "t.pth").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable"):
        load_pickled_list(str(tmp_path / "t.pth"))


def test_not_a_list(tmp_path):
    torch.save({"a": 1}, tmp_path / "d.pth")
    with pytest.raises(ValueError, match="holds a dict, expected a list"):
        load_pickled_list(str(tmp_path / "d.pth"))


@pytest.mark.parametrize("dataset, entry, message", [
    ("unc", ENTRY[:3], "expected a 5-tuple in the 'unc' layout, got a 3-tuple"),
    ("flickr", ENTRY, "expected a 3-tuple in the 'flickr' layout"),
    ("unc", (ENTRY[0], "480x640") + ENTRY[2:], "expected a size dict"),
    ("unc", (ENTRY[0], {"height": 480}) + ENTRY[2:], "needs integer 'height' and 'width'"),
    ("unc", ENTRY[:2] + ([1, 2, 3],) + ENTRY[3:], "the box must be 4 finite numbers"),
    ("unc", ENTRY[:2] + ([1, 2, float("nan"), 4],) + ENTRY[3:], "the box must be 4 finite numbers"),
    ("unc", ENTRY[:3] + (None,) + ENTRY[4:], "must be strings"),
    ("mixup", ("x.jpg", "coco") + ENTRY[2:], "neither a COCO_\\* file nor marked"),
    ("unc", "just a string", "expected a 5-tuple"),
    ("unc", ("/data/COCO_train2014_1.jpg",) + ENTRY[1:], "the image path '/data/COCO_train2014_1.jpg' leads outside "
                                                         "the image folder <data_root>/other/images/mscoco"),
    ("flickr", ("../../x.jpg", [1, 2, 3, 4], "x"), "leads outside the image folder <data_root>/Flickr30k/.*"
                                                   "--allow_outside_paths"),
])
def test_malformed_entries_name_the_file_and_entry(tmp_path, dataset, entry, message):
    (tmp_path / dataset).mkdir()
    path = tmp_path / dataset / f"{dataset}_train.pth"
    torch.save([ENTRY if dataset != "flickr" else (ENTRY[0], ENTRY[2], ENTRY[3]), entry], path)
    with pytest.raises(ValueError, match=message) as err:
        load_refs(str(tmp_path), dataset, "train")
    assert f"split file {path}, entry 1" in str(err.value)
