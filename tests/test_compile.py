"""--compile: torch.compile (inductor) of the tiny model on the CPU gives eager's outputs and eager's training
run, with one graph break, at the data-dependent text length (models/hivg.py, text_length). Compiling is
slow on a small CPU (about a minute per graph, cold cache), so the cases are few and short."""
import json

import pytest
import torch
from torch._dynamo.utils import counters

import eval as eval_script
import train_hivg
from datasets.tokens import tokenize
from models.flags import default_config
from models.hivg import HiVG
from tests.conftest import flags
from tests.test_train import assert_same_weights


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code is cached per code object across models: a clean slate for each test, so that no
    earlier test's entries count against the recompile limit (past it, dynamo runs eagerly, silently)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def graph_breaks():
    return [reason.splitlines()[0] for reason in counters["graph_break"]]


@pytest.mark.recorded
def test_compiled_forward_equals_eager():
    torch.manual_seed(0)
    model = HiVG(default_config("tiny", image_size=64, context_length=16, fusion_ffn=64, hi_lora_stage=1,
                                outputs=["box", "token_map", "seg_map"])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):  # unmerged adapters doing real work
                p.normal_(0, 0.05)
    compiled = torch.compile(model)
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(2, 64, 64, dtype=torch.int32)
    mask[1, :, 48:] = 1
    with torch.no_grad():
        for texts in (["a cat", "the dog"], ["the second man from the left in a red coat", "cup"]):
            images, ids = torch.randn(2, 3, 64, 64, generator=g), tokenize(texts, 16)
            want, got = model(images, mask, ids), compiled(images, mask, ids)
            assert want.keys() == got.keys()
            # fp32 with sums reassociated by the generated kernels: measured differences are below 1e-6.
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    assert graph_breaks() == ["Skip calling `torch.compiler.disable()`d function"]
    assert counters["stats"]["unique_graphs"] == 3   # towers; fusion and heads; the same at a symbolic length


def test_compiled_training_run_equals_eager(small_data, tmp_path):
    common = ["--epochs", "1", "--vl_dropout", "0"]   # 2 steps of 8 samples, no random masks
    assert train_hivg.main(flags(small_data, tmp_path / "eager", *common)) == 0
    assert train_hivg.main(flags(small_data, tmp_path / "compiled", *common, "--compile")) == 0
    assert graph_breaks() == ["Skip calling `torch.compiler.disable()`d function"]
    assert_same_weights(tmp_path / "eager" / "checkpoint.pth", tmp_path / "compiled" / "checkpoint.pth")
    losses = [json.loads((tmp_path / run / "log.txt").read_text())["train_loss"] for run in ("eager", "compiled")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_eval_compile_flag_evaluates_through_the_compiled_model(small_data, tmp_path, monkeypatch):
    """The wiring of eval.py --compile; dynamo's eager backend keeps it quick (inductor is checked above)."""
    assert train_hivg.main(flags(small_data, tmp_path / "run", "--epochs", "1")) == 0
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real(model, backend="eager"))
    results = []
    for extra in ([], ["--compile"]):
        out = tmp_path / ("compiled" if extra else "eager")
        assert eval_script.main(["--eval_model", str(tmp_path / "run" / "checkpoint.pth"), "--eval_set", "val",
                                 "--num_workers", "0", "--output_dir", str(out), *extra]) == 0
        results.append(json.loads((out / "eval_checkpoint.json").read_text())["synthref"]["val"])
    assert counters["stats"]["unique_graphs"] >= 2   # only the --compile run compiled
    assert results[1]["acc"] == results[0]["acc"] and results[1]["miou"] == pytest.approx(results[0]["miou"], abs=1e-6)
