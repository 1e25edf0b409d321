"""Shared test settings (CPU only, deterministic, two threads: the CI machine's size) and the fixtures several
test modules use: synthetic data sets, a tiny checkpoint, a trained stage-0 run."""
import argparse
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def is_project_source(path: Path, root: Path = REPO) -> bool:
    """A file of the project under `root`, outside its tests and its .venv; judged by the parts of the path
    below `root`, so a clone that lives inside a folder named `tests` is still the project."""
    path = Path(path)
    return path.is_relative_to(root) and path.relative_to(root).parts[0] not in ("tests", ".venv")


sys.path.insert(0, str(REPO))

from datasets.synthetic import generate  # noqa: E402
from models.api import Grounder  # noqa: E402
from models.checkpoint_format import training_file  # noqa: E402
from models.flags import add_model_args  # noqa: E402
from models.hivg import build_model  # noqa: E402
from utils.checkpoint import rng_state, save_checkpoint  # noqa: E402
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory):
    """make(num_train, num_val, num_test, imsize=64, seed=0): the folder (data_root = split_root) of a synthref
    set of these sizes, generated once per session and shared: a test that changes a set copies it first."""
    made = {}

    def make(num_train: int, num_val: int, num_test: int, imsize: int = 64, seed: int = 0) -> Path:
        key = (num_train, num_val, num_test, imsize, seed)
        if key not in made:
            made[key] = tmp_path_factory.mktemp("synthref")
            generate(str(made[key]), num_train=num_train, num_val=num_val, num_test=num_test, seed=seed,
                     imsize=imsize)
        return made[key]
    return make


@pytest.fixture(scope="session")
def data(synthetic_set):
    """The training runs' set: 48 train, 13 val, 11 test expressions, 64 px."""
    return synthetic_set(48, 13, 11)


@pytest.fixture(scope="session")
def small_data(synthetic_set):
    """For runs of a few steps (compiled, on CUDA): 16 train, 6 val, 2 test expressions, 64 px."""
    return synthetic_set(16, 6, 2)


@pytest.fixture(scope="session")
def synth_dir(synthetic_set):
    """The synthetic set's own tests: 60 train, 20 val, 40 test expressions, 96 px."""
    return synthetic_set(60, 20, 40, imsize=96, seed=3)


def flags(data, out, *extra):
    """train_hivg.py's flags for a short run of the tiny model on the synthetic set `data`, into `out`."""
    return ["--model", "tiny", "--dataset", "synthref", "--data_root", str(data), "--split_root", str(data),
            "--imsize", "64", "--max_query_len", "16", "--batch_size", "8", "--lr", "1e-3", "--lr_scheduler", "cosine",
            "--use_rtcc_constrain_loss", "--use_mask_loss", "--num_workers", "0", "--output_dir", str(out), *extra]


@pytest.fixture(scope="session")
def stage0(data, tmp_path_factory):
    """A finished three-epoch stage-0 run of `flags` (read only: a test that writes into a run copies it)."""
    import train_hivg
    out = tmp_path_factory.mktemp("stage0")
    assert train_hivg.main(flags(data, out, "--epochs", "3")) == 0
    return out


def save_tiny(folder: Path, *head_flags: str):
    """(checkpoint path, model): a tiny stage-1 model with fixed random weights (LoRA non-zero) and the heads
    of `head_flags`, saved into `folder` as train_hivg.py saves."""
    torch.manual_seed(0)
    args = add_model_args(argparse.ArgumentParser()).parse_args(
        ["--model", "tiny", "--imsize", "64", "--vl_dim_feedforward", "64", "--hi_lora_stage", "1", *head_flags])
    model = build_model(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    path = folder / "best_checkpoint.pth"
    save_checkpoint(path, training_file(model, vars(args), optimizer={}, scheduler={}, scaler=None, rng=[rng_state()],
                                        epoch=0, resume_at=(1, 0), best_acc=0.1, step_base=0, stage_end_step=0))
    return path, model.eval()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """save_tiny with the token-alignment head."""
    return save_tiny(tmp_path_factory.mktemp("ckpt"), "--use_rtcc_constrain_loss")


@pytest.fixture(scope="session")
def tiny_seg(tmp_path_factory):
    """save_tiny with the token-alignment and segmentation heads (random weights: masks of no meaning)."""
    return save_tiny(tmp_path_factory.mktemp("ckpt_seg"), "--use_rtcc_constrain_loss", "--use_mask_loss")


@pytest.fixture(scope="session")
def grounder(tiny):
    return Grounder.from_checkpoint(tiny[0])


@pytest.fixture(scope="session")
def tiny_loaded(grounder):
    return grounder.model




class Payload:
    """Unpickling it would create `marker` through os.system (a module torch's weights-only loader blocks)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# kind of bad checkpoint file -> what the message says after "FLAG PATH"
BAD_CHECKPOINTS = {"missing": "does not exist", "folder": "is a folder", "empty": "is empty (0 bytes)",
                   "truncated": "is truncated", "text": "is not a PyTorch or safetensors file",
                   "malicious": "holds Python objects besides tensors and plain types (posix.system)"}


def write_bad_checkpoint(kind: str, folder: Path, good: Path) -> Path:
    """A bad checkpoint file of `kind` (BAD_CHECKPOINTS) in `folder`; `good` is a real one to truncate. The
    malicious one would create folder/ran if it were ever unpickled."""
    path = folder / f"{kind}.pth"
    if kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        raw = good.read_bytes()
        path.write_bytes(raw[:len(raw) // 2])
    elif kind == "text":
        path.write_text("best_checkpoint.pth\n")
    elif kind == "malicious":
        torch.save({"model": Payload(folder / "ran"), "config": {}}, path)
    return path
