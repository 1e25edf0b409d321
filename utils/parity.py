"""Check our HiVG against a golden fixture produced by the authors' implementation.

    python -m utils.parity DIR [DIR ...]

A fixture folder holds config.json (HF CLIP config + the official argparse values), checkpoint.pth
(official state dict), inputs.pth, outputs.pth and trainable.json (see its README). The model is built
from config.json, the checkpoint converted and loaded strictly, and the inputs run with the int32 padding
mask twice: `--bridge_attention official` against outputs['collate_int32_mask'] and the per-sample
bridge against outputs['per_sample_int32_mask']. Then the trainable set of `--hi_lora_mode official`
is compared with trainable.json. One line per comparison; exit status 1 on any failure.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from datasets.tokens import tokenize
from models.convert import canonical_key, convert_official_state_dict, map_key, official_config
from models.heads import official_loss_names
from models.hivg import HiVG
from models.weights import load_strict, read_file
from models.convert_clip import hf_config_to_open_clip_cfg
from utils.losses import GroundingCriterion

ATOL = {"logits_per_text": 5e-5, "logits_per_image": 5e-5}
DEFAULT_ATOL = 1e-5
RTOL = 1e-5
# official output name -> ours
OUTPUT_NAMES = {"pred_box": "pred_box", "logits_per_text": "logits_per_text", "visu_token_similarity": "token_map",
                "seg_mask": "seg_map"}
# Every fixture was made with the three auxiliary losses on: the official loss dict has all seven terms.
CRITERION = GroundingCriterion(heads=("contrastive", "token_map", "seg_map"))


def _load(path: Path):
    return read_file(path, "fixture file")


def build_from_fixture(folder: Path, bridge_attention: str):
    config = json.loads((folder / "config.json").read_text())
    clip_cfg = hf_config_to_open_clip_cfg(config["clip_config"])
    model = HiVG(official_config(config["hivg_args"], clip_cfg, bridge_attention=bridge_attention))
    state = read_file(folder / "checkpoint.pth")["model"]  # the fixture holds the weights only
    load_strict(model, convert_official_state_dict(state, expected=model.state_dict()))
    derived = config.get("derived", {})
    if "adapt_layer" in derived and derived["adapt_layer"] != model.bridge_layers:
        raise ValueError(f"{folder}: bridge layers {model.bridge_layers} differ from the fixture's {derived['adapt_layer']}")
    if "extract_vision_layer" in derived and [i - 1 for i in derived["extract_vision_layer"]] != model.extract_layers:
        raise ValueError(f"{folder}: extracted layers {model.extract_layers} differ from the fixture's")
    return model.eval()


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor) -> Tuple[str, bool]:
    atol = ATOL.get(name, DEFAULT_ATOL)
    if actual.shape != expected.shape:
        return f"{name} shape {tuple(actual.shape)} != {tuple(expected.shape)} FAIL", False
    err = (actual.double() - expected.double()).abs()
    ok = bool((err <= atol + RTOL * expected.double().abs()).all())
    return f"{name} {err.max().item():.3e} {atol:.0e} {'ok' if ok else 'FAIL'}", ok


def run_outputs(model, inputs) -> Dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(inputs["img"], inputs["img_mask_int32"], tokenize(inputs["texts"], model.context_length))
    out["logits_per_image"] = out["logits_per_text"].t()
    losses = CRITERION(out, {"boxes": inputs["gt_box_cxcywh"], "obj_masks": inputs["obj_mask"]})
    out.update(losses)
    out["loss_total"] = sum(losses.values())
    return out


def trainable_names(model) -> List[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def expected_trainable(official_names: List[str], model) -> Tuple[List[str], List[str]]:
    """Official trainable names mapped to ours; names of unused official parameters are set aside."""
    ours = set(dict(model.named_parameters()))
    mapped, unused = set(), []
    for name in official_names:
        new, _, _ = map_key(canonical_key(name))
        if new is None or new not in ours:
            unused.append(name)
        else:
            mapped.add(new)
    return sorted(mapped), unused


def check_folder(folder: Path) -> bool:
    inputs, outputs = _load(folder / "inputs.pth"), _load(folder / "outputs.pth")
    ok_all = True

    def report(line_ok):
        nonlocal ok_all
        line, ok = line_ok
        print(f"  {line}")
        ok_all &= ok

    print(f"{folder}")
    model = build_from_fixture(folder, "official")
    ids = tokenize(inputs["texts"], model.context_length)
    report(("text_tokens identical " + ("ok" if torch.equal(ids, inputs["text_tokens"].long()) else "FAIL"),
            torch.equal(ids, inputs["text_tokens"].long())))
    ref = outputs["collate_int32_mask"]
    ours = run_outputs(model, inputs)
    print(" official bridge vs collate_int32_mask:")
    for off, mine in {**OUTPUT_NAMES, "logits_per_image": "logits_per_image"}.items():
        report(compare(off, ours[mine], ref[off]))
    for off, value in ref["losses"].items():
        report(compare(off, ours[official_loss_names()[off]], value))
    report(compare("loss_total", ours["loss_total"], ref["loss_total"]))

    per_sample_model = build_from_fixture(folder, "per_sample")
    ours = run_outputs(per_sample_model, inputs)
    print(" per-sample bridge vs per_sample_int32_mask:")
    for off, value in outputs["per_sample_int32_mask"].items():
        report(compare(off, ours[OUTPUT_NAMES[off]], value))

    print(" trainable set (--hi_lora_mode official):")
    official = json.loads((folder / "trainable.json").read_text())
    expected, unused = expected_trainable(official, model)
    actual = trainable_names(model)
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    same = not missing and not extra
    report((f"trainable {len(official)} official -> {len(expected)} ours (+{len(unused)} unused official "
            f"parameters) {'ok' if same else 'FAIL'}", same))
    for name in missing[:10]:
        print(f"    missing trainable: {name}")
    for name in extra[:10]:
        print(f"    extra trainable: {name}")
    return ok_all


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    opts = parser.parse_args(argv)
    ok = True
    for folder in opts.folders:
        if not (folder / "config.json").is_file():
            parser.error(f"{folder} is not a fixture folder (no config.json)")
        ok &= check_folder(folder)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
