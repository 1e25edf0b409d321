"""Shared test settings: CPU only, deterministic, two threads (the CI machine's size)."""
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

from models.api import Grounder  # noqa: E402
from models.flags import add_model_args  # noqa: E402
from models.hivg import build_model  # noqa: E402
from utils.checkpoint import rng_state, save_checkpoint  # noqa: E402
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny stage-1 model with fixed random weights (LoRA non-zero) saved as train_hivg.py saves."""
    torch.manual_seed(0)
    args = add_model_args(argparse.ArgumentParser()).parse_args(
        ["--model", "tiny", "--imsize", "64", "--vl_dim_feedforward", "64", "--hi_lora_stage", "1",
         "--use_rtcc_constrain_loss"])
    model = build_model(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "best_checkpoint.pth"
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": None,
                           "epoch": 0, "resume_at": (1, 0), "stage": 1, "hi_lora_mode": "paper",
                           "args": vars(args), "config": model.config.to_dict(), "rng": [rng_state()],
                           "best_acc": 0.1, "val_acc": 0.1})
    return path, model.eval()


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
