"""The fp32 tolerance of comparisons with recorded outputs (tests/tolerance.py), and CI's second pass of the
tests marked `recorded` on PyTorch's portable kernels."""
import configparser

import pytest
import torch

from models.weights import load_model
from tests import test_config, test_model, test_train
from tests.conftest import REPO
from tests.tolerance import EPS, fp32_atol, model_depth


def test_tolerance_is_a_few_ulps_of_the_largest_value_per_layer():
    expected = torch.tensor([0.5, -4.0, 1e-3])
    assert EPS == 2 ** -23
    assert fp32_atol(expected, depth=8) == pytest.approx(4 * 2 ** -23 * 8 * 4.0)
    assert fp32_atol(expected, depth=16) == 2 * fp32_atol(expected, depth=8)
    assert fp32_atol(expected, depth=8, scale=14.0) == pytest.approx(4 * 2 ** -23 * 8 * 14.0)   # beyond the values
    assert fp32_atol(expected, depth=8, scale=1.0) == fp32_atol(expected, depth=8)


def test_the_legacy_tolerance_still_sees_a_missing_adapter():
    """Zeroing the LoRA updates of the legacy checkpoint moves every output beyond its tolerance."""
    legacy = test_config.LEGACY
    io = torch.load(legacy / "io.pth", weights_only=True)
    model = load_model(legacy / "checkpoint.pth", merge=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
        out = model(io["images"], io["pixel_mask"], io["ids"], outputs=list(model.config.outputs))
    assert model_depth(model.config) == 8                       # 6 vision blocks (text: 4), 1 fusion block, a head
    scale = {"logits_per_text": model.clip.logit_scale.exp().item()}   # as test_config compares them
    for key in ("pred_box", "logits_per_text", "token_map", "seg_map"):
        atol = fp32_atol(io["outputs"][key], depth=8, scale=scale.get(key, 0.0))
        assert (out[key] - io["outputs"][key]).abs().max() > atol, key


def test_ci_runs_the_recorded_tests_again_on_the_portable_kernels():
    ini = configparser.ConfigParser()
    ini.read(REPO / "pytest.ini")
    assert any(line.startswith("recorded:") for line in ini["pytest"]["markers"].splitlines())
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert lines[-1] == ('ATEN_CPU_CAPABILITY=default TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)" '
                         '.venv/bin/python -m pytest -q -m recorded')
    for test in (test_config.test_legacy_checkpoint_loads_and_gives_the_same_outputs,
                 test_model.test_parity_with_official_fixture, test_train.test_two_rank_gloo_run_equals_one_rank):
        assert "recorded" in [mark.name for mark in test.pytestmark], test.__name__
