"""The model config travels with the checkpoint; one loader for every format; the Python API and
torch.hub entry; flag inheritance of resumed runs and Hi LoRA stages."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import models.configs
import train_hivg
from datasets.tokens import tokenize
from models.checkpoint_format import model_file
from models.config import HiVGConfig
from models.flags import default_config
from models.hivg import HiVG
from models.weights import load_model, read_weights
from tests.conftest import REPO, is_project_source
from tests.tolerance import assert_close_fp32, model_depth
from utils.checkpoint import save_checkpoint
from utils.run_flags import given_flags, inherit_flags

LEGACY = REPO / "tests" / "checkpoints" / "legacy_v1_stage1"
LEGACY_V2 = REPO / "tests" / "checkpoints" / "legacy_v2_stage1"


def tiny_model(**changes):
    return HiVG(default_config("tiny", image_size=64, context_length=16, fusion_ffn=64,
                               outputs=["box", "token_map"], **changes))


def save_ours(path, model):
    save_checkpoint(path, model_file(model, {}))


def test_config_round_trips_through_plain_types(tmp_path):
    cfg = tiny_model(hi_lora_stage=2).config
    text = json.dumps(cfg.to_dict())                       # plain values only
    assert HiVGConfig.from_dict(json.loads(text)) == cfg
    with pytest.raises(ValueError, match="unknown entries \\['bogus'\\]"):
        HiVGConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    path = tmp_path / "ck.pth"
    save_ours(path, tiny_model())
    assert isinstance(torch.load(path, weights_only=True)["config"], dict)


@pytest.mark.recorded
@pytest.mark.parametrize("folder, kind, text_layers", [(LEGACY, "hivg-flags", [1, 3]), (LEGACY_V2, "hivg", [1])])
def test_legacy_checkpoint_loads_and_gives_the_same_outputs(folder, kind, text_layers):
    weights = read_weights(folder / "checkpoint.pth")
    assert weights.kind == kind
    assert (weights.config.bridge_layers, weights.config.text_layers, weights.config.hi_lora_stage) == \
        ([1, 3, 5], text_layers, 1)
    model = load_model(folder / "checkpoint.pth", merge=False)
    io = torch.load(folder / "io.pth", weights_only=True)
    assert torch.equal(tokenize(io["texts"], model.context_length), io["ids"])
    with torch.no_grad():
        out = model(io["images"], io["pixel_mask"], io["ids"], outputs=["box", "contrastive", "token_map",
                                                                         "seg_map", "reg_attention"])
    scale = {"logits_per_text": model.clip.logit_scale.exp().item()}   # cosines times CLIP's logit scale
    for key, value in io["outputs"].items():
        assert_close_fp32(out[key], value, depth=model_depth(model.config), name=key, scale=scale.get(key, 0.0))


def test_editing_a_json_config_does_not_change_what_a_checkpoint_builds(tmp_path, monkeypatch):
    model = tiny_model()
    path = tmp_path / "ck.pth"
    save_ours(path, model)
    configs = tmp_path / "configs"
    shutil.copytree(models.configs.CONFIG_DIR, configs)
    tiny = json.loads((configs / "tiny.json").read_text())
    tiny.update(bridge_layers=[0, 2], extract_layers=[0, 2, 4, 5])
    (configs / "tiny.json").write_text(json.dumps(tiny))
    monkeypatch.setattr(models.configs, "CONFIG_DIR", configs)
    assert tiny_model().bridge_layers == [0, 2]        # the edit is live for new runs ...
    reloaded = load_model(path, merge=False)                       # ... not for an existing checkpoint
    assert reloaded.bridge_layers == [1, 3, 5] and reloaded.extract_layers == [1, 3, 5]
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_every_format_goes_through_one_reader(tmp_path):
    model = tiny_model()
    save_ours(tmp_path / "ours.pth", model)
    torch.save(model.clip.state_dict(), tmp_path / "clip.pth")
    kinds = {name: read_weights(tmp_path / name).kind for name in ("ours.pth", "clip.pth")}
    kinds["legacy"] = read_weights(LEGACY / "checkpoint.pth").kind
    assert kinds == {"ours.pth": "hivg", "clip.pth": "clip", "legacy": "hivg-flags"}
    with pytest.raises(ValueError, match="holds CLIP weights"):
        load_model(tmp_path / "clip.pth")
    with pytest.raises(ValueError, match="drop --hf_clip_config"):
        read_weights(tmp_path / "ours.pth", clip_cfg=model.config.clip)
    sources = [p.read_text() for p in REPO.glob("**/*.py") if is_project_source(p)]
    calls = sum(len(re.findall(r"torch\.load\(", s)) for s in sources)
    split_files = sum(len(re.findall(r"torch\.load\(", (REPO / f).read_text()))
                      for f in ("datasets/splitfile.py", "datasets/synthetic.py"))
    assert calls - split_files == 1                                 # models/weights.py:read_file


def test_source_filters_look_below_the_repository_only(tmp_path):
    clone = tmp_path / "tests" / "hivg"                        # a clone inside a folder named tests
    assert is_project_source(clone / "train_hivg.py", root=clone)
    assert is_project_source(clone / "models" / "weights.py", root=clone)
    assert not is_project_source(clone / "tests" / "test_config.py", root=clone)
    assert not is_project_source(clone / ".venv" / "lib" / "torch" / "serialization.py", root=clone)
    assert not is_project_source(tmp_path / "tests" / "other.py", root=clone)


def readme_api_block() -> str:
    text = (REPO / "README.md").read_text()
    return re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)


def test_the_readme_api_lines_run_as_written(tmp_path, monkeypatch):
    code = readme_api_block()
    assert len(code.strip().splitlines()) == 5
    ckpt = re.search(r'from_checkpoint\("([^"]+)"', code).group(1)
    image = re.search(r'Image\.open\("([^"]+)"\)', code).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ckpt).parent.mkdir(parents=True, exist_ok=True)
    save_ours(tmp_path / ckpt, tiny_model())
    (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(tmp_path / image)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    hit = scope["hit"]
    assert len(hit.box_xyxy) == 4 and 0 <= hit.box_xyxy[0] <= hit.box_xyxy[2] <= 80 and 0 <= hit.score <= 1


def test_torch_hub_loads_the_local_clone(tmp_path):
    model = tiny_model()
    save_ours(tmp_path / "ck.pth", model)
    grounder = torch.hub.load(str(REPO), "hivg", source="local", checkpoint=str(tmp_path / "ck.pth"))
    img = Image.fromarray(np.zeros((30, 60, 3), dtype=np.uint8))
    [hit] = grounder.ground([img], ["the left one"])
    assert grounder.model.bridge_layers == [1, 3, 5] and len(hit.box_xyxy) == 4


def test_given_flags_are_the_ones_on_the_command_line():
    given = given_flags(train_hivg.get_args_parser, ["--lr", "1e-4", "--no-normalize_before", "--epochs=3"])
    assert given == {"lr": 1e-4, "normalize_before": False, "epochs": 3}     # --lr equals its default: still given


def test_a_stage_inherits_flags_and_the_command_line_wins():
    defaults = {"lr": 1e-4, "epochs": 90, "dataset": "referit", "hi_lora_stage": 0, "output_dir": "./outputs",
                "clip_model": ""}
    previous = {"lr": 2.5e-4, "epochs": 60, "dataset": "unc", "hi_lora_stage": 1, "output_dir": "/x/s1",
                "clip_model": "/ckpt/clip.pt", "unknown_flag": 1}
    nxt = inherit_flags(defaults, {"lr": 5e-5}, previous, kind="hi_lora_retrain",
                        checkpoint="/x/s1/best_checkpoint.pth")
    assert nxt == {"lr": 5e-5, "epochs": 60, "dataset": "unc", "hi_lora_stage": 2,
                   "output_dir": "/x/s1/hi_lora_stage2", "clip_model": ""}
    again = inherit_flags(defaults, {"hi_lora_stage": 1, "lr": 2.5e-4}, previous, kind="resume",
                          checkpoint="/x/s1/checkpoint.pth")
    assert again["hi_lora_stage"] == 1 and again["output_dir"] == "/x/s1" and again["lr"] == 2.5e-4
    with pytest.raises(ValueError, match="cannot change --epochs, --lr"):      # would be ignored or train at lr 0
        inherit_flags(defaults, {"lr": 1e30, "epochs": 61, "output_dir": "/y"}, previous, kind="resume",
                      checkpoint="/x/s1/c.pth")
    with pytest.raises(ValueError, match="last Hi LoRA stage"):
        inherit_flags(defaults, {}, {**previous, "hi_lora_stage": 3}, kind="hi_lora_retrain",
                      checkpoint="/x/s3/best.pth")


def test_the_config_rebuilds_the_same_network():
    model = tiny_model(hi_lora_stage=1)
    twin = HiVG(model.config)
    assert twin.state_dict().keys() == model.state_dict().keys()
    assert [n for n, p in twin.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]
