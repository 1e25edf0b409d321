"""The checkpoint format has one owner (models.checkpoint_format): what it writes, its version, what a reader
refuses, and which flags a resumed run or the next stage takes from the config."""
import argparse

import pytest
import torch

from models.checkpoint_format import FORMAT, check_resumable, inherited_flags, model_file
from models.flags import add_model_args
from models.hivg import build_model
from models.weights import load_model, read_weights
from utils.checkpoint import save_checkpoint


def tiny_model(*extra):
    args = add_model_args(argparse.ArgumentParser()).parse_args(
        ["--model", "tiny", "--imsize", "64", "--max_query_len", "16", "--vl_dim_feedforward", "64", *extra])
    return build_model(args), vars(args)


def test_a_model_file_carries_its_format_and_reloads_without_training_state(tmp_path):
    model, flags = tiny_model("--hi_lora_stage", "1")
    path = tmp_path / "model.pth"
    save_checkpoint(path, model_file(model, flags))
    weights = read_weights(path)
    assert weights.kind == "hivg" and weights.checkpoint["format"] == FORMAT and weights.run_args == flags
    with pytest.raises(ValueError, match=r"^--resume \S+ holds a model but no training state \(optimizer, scheduler, "
                                         r"rng, resume_at, best_acc missing\), .* with --retrain$"):
        check_resumable(weights.checkpoint, f"--resume {path}")
    reloaded = load_model(weights, merge=False)
    assert reloaded.config == model.config
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_newer_format_is_refused_in_one_line_naming_the_file(tmp_path):
    model, flags = tiny_model()
    path = tmp_path / "future.pth"
    save_checkpoint(path, dict(model_file(model, flags), format=FORMAT + 1))
    with pytest.raises(ValueError, match=rf"^--checkpoint {path} has checkpoint format {FORMAT + 1}, and this code "
                                         rf"reads formats 1 to {FORMAT}: .* update the code to read it$"):
        read_weights(path, what="--checkpoint")


def test_the_network_flags_a_run_inherits_come_from_the_config():
    model, _ = tiny_model("--hi_lora_stage", "2", "--hi_lora_mode", "official", "--bridge_attention", "official")
    stored = {"imsize": 224, "max_query_len": 77, "hi_lora_mode": "paper", "lr": 1e-4, "dataset": "unc"}
    flags = inherited_flags(stored, model.config)
    assert flags == {"imsize": 64, "max_query_len": 16, "hi_lora_stage": 2, "hi_lora_mode": "official",
                     "bridge_attention": "official", "mixup_pretrain": False, "lr": 1e-4, "dataset": "unc"}
    assert stored["imsize"] == 224                                   # the stored flags are left as they were
