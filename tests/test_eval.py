"""eval.py: exact under any number of ranks, metric bookkeeping, clear errors."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from eval import main as eval_main
from models.checkpoint_format import model_file
from models.flags import add_model_args
from models.hivg import build_model
from models.weights import load_model, read_weights
from utils.checkpoint import save_checkpoint
from tests.conftest import BAD_CHECKPOINTS, write_bad_checkpoint
from utils.engine import length_bucket, summarize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(synthetic_set, tmp_path_factory):
    """The data (4 train, 13 val, 7 test expressions) and a tiny stage-1 checkpoint of a run on it, with the
    segmentation head."""
    root = synthetic_set(4, 13, 7)
    parser = add_model_args(argparse.ArgumentParser())
    args = parser.parse_args(["--model", "tiny", "--dataset", "synthref", "--imsize", "64", "--max_query_len", "16",
                              "--hi_lora_stage", "1", "--use_mask_loss"])
    model = build_model(args)
    run_args = {**vars(args), "data_root": str(root), "split_root": str(root)}
    ckpt = tmp_path_factory.mktemp("eval") / "best_checkpoint.pth"
    save_checkpoint(ckpt, model_file(model, run_args))
    return root, ckpt


def run(args, nproc=1):
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"] if nproc > 1 else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *launcher, "eval.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)


def test_two_ranks_equal_one_rank_exactly(setup, tmp_path):
    """Batch 1 per rank keeps each sample's arithmetic identical, on any CPU: the same kernels at the same
    shapes on both sides (batched CPU kernels round differently with the batch's size); every sample is
    counted once on both sides. The mask metrics too (mIoU, oIoU, precisions, filled-box mIoU)."""
    _, ckpt = setup
    results = []
    for nproc in (1, 2):
        out = tmp_path / str(nproc)
        proc = run(["--eval_model", str(ckpt), "--eval_set", "val", "test", "--batch_size", "1",
                    "--num_workers", "0", "--output_dir", str(out)], nproc)
        assert proc.returncode == 0, proc.stderr
        assert "test Acc@0.5:" in proc.stdout and "len 1-5" in proc.stdout
        assert "test Acc@0.5 attributes only:" in proc.stdout and "test Acc@0.5 location or relation:" in proc.stdout
        results.append(json.loads((out / "eval_best_checkpoint.json").read_text()))
    assert results[0]["synthref"]["val"]["count"] == 13 and results[0]["synthref"]["test"]["count"] == 7
    for split in ("val", "test"):
        metrics = results[0]["synthref"][split]["metrics"]
        assert {"mask_miou", "mask_oiou", "mask_prec@0.5", "box_mask_miou"} <= set(metrics)
        for key in ("count", "acc", "miou", "acc_by_length", "acc_by_group", "metrics"):
            assert results[0]["synthref"][split][key] == results[1]["synthref"][split][key]
        r = results[0]["synthref"][split]
        groups = r["acc_by_group"].values()
        assert sum(g["count"] for g in groups) == r["count"]
        assert abs(sum(g["acc"] * g["count"] for g in groups) - r["acc"] * r["count"]) < 1e-9


def test_summary_buckets():
    phrases = ["a", "one two three four five six", "w " * 8 + "x", "w " * 12 + "x"]
    assert [length_bucket(p) for p in phrases] == ["1-5", "6-7", "8-10", "11+"]
    s = summarize([0.5, 0.49, 1.0, 0.0], phrases)
    assert s["acc"] == 0.5 and s["count"] == 4 and abs(s["miou"] - 1.99 / 4) < 1e-12
    assert s["acc_by_length"]["1-5"] == {"count": 1, "acc": 1.0}


def test_errors(setup, tmp_path):
    root, ckpt = setup
    proc = run(["--eval_model", str(tmp_path / "missing.pth"), "--eval_set", "val"])
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    bad = read_weights(ckpt).checkpoint
    bad["config"]["hi_lora_stage"] = 0
    save_checkpoint(tmp_path / "bad.pth", bad)
    proc = run(["--eval_model", str(tmp_path / "bad.pth"), "--eval_set", "val"])
    assert proc.returncode != 0 and "does not match the model" in proc.stderr
    proc = run(["--eval_model", str(ckpt), "--eval_set", "testA"])
    assert proc.returncode != 0 and "has no split 'testA'" in proc.stderr


def test_visualize_writes_half_hits_half_misses(setup, tmp_path):
    _, ckpt = setup
    out = tmp_path / "vis"
    proc = run(["--eval_model", str(ckpt), "--eval_set", "test", "--num_workers", "0", "--output_dir", str(out),
                "--visualize", "4"])
    assert proc.returncode == 0, proc.stderr
    pictures = sorted((out / "vis_best_checkpoint").glob("test_*.png"))
    assert len(pictures) == 4 and "test: 4 pictures" in proc.stdout
    results = json.loads((out / "eval_best_checkpoint.json").read_text())["synthref"]
    assert "ious" not in results["test"]
    n_hits = round(results["test"]["acc"] * 7)
    want_hits = min(n_hits, 2) if 7 - n_hits >= 2 else min(n_hits, 4 - (7 - n_hits))
    assert sum(p.stem.endswith("_hit") for p in pictures) == want_hits


def test_model_flags_are_refused_the_checkpoint_defines_the_model(setup, tmp_path):
    _, ckpt = setup
    proc = run(["--eval_model", str(ckpt), "--eval_set", "val", "--model", "ViT-L/14", "--imsize", "336"])
    assert proc.returncode == 2 and "unrecognized arguments: --model ViT-L/14 --imsize 336" in proc.stderr


def test_results_are_keyed_by_dataset_and_split_and_kept(setup, tmp_path):
    root, ckpt = setup
    out = tmp_path / "eval_best_checkpoint.json"
    out.write_text(json.dumps({"unc": {"val": {"acc": 0.5}}}))
    for split in ("val", "test"):
        proc = run(["--eval_model", str(ckpt), "--eval_set", split, "--num_workers", "0", "--output_dir", str(tmp_path)])
        assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert results["unc"] == {"val": {"acc": 0.5}}                  # another dataset's entry is kept
    assert set(results["synthref"]) == {"val", "test"} and results["synthref"]["val"]["count"] == 13
    assert results["synthref"]["test"]["checkpoint"] == str(ckpt)


def with_official_bridge(ckpt, folder):
    """A copy of `ckpt` whose config says the authors' batch-mixing bridge."""
    official = folder / "official_bridge.pth"
    content = read_weights(ckpt).checkpoint
    content["config"]["bridge_attention"] = "official"
    save_checkpoint(official, content)
    return official


def test_bridge_attention_defaults_to_the_checkpoint_and_can_be_chosen(setup, tmp_path):
    _, ckpt = setup
    official = with_official_bridge(ckpt, tmp_path)
    assert load_model(official).bridges["1"].bridge_attention == "official"
    assert load_model(official, bridge_attention="per_sample").bridges["1"].bridge_attention == "per_sample"
    for choice, expected in (([], "official"), (["--bridge_attention", "per_sample"], "per_sample")):
        proc = run(["--eval_model", str(official), "--eval_set", "val", "--num_workers", "0",
                    "--output_dir", str(tmp_path), *choice])
        assert proc.returncode == 0, proc.stderr
        assert f"bridge attention: {expected}" in proc.stdout


def test_paper_table_puts_our_numbers_beside_the_paper(tmp_path, capsys):
    from eval import write_results
    from utils import paper_table

    def result(acc):
        return {"count": 10, "acc": acc, "miou": acc, "acc_by_length": {}}

    first, second = tmp_path / "unc" / "eval_best.json", tmp_path / "referit" / "eval_best.json"
    write_results(first, "unc", "ck.pth", results={"val": result(0.8732), "testA": result(0.9)})
    write_results(first, "unc", "ck.pth", results={"testB": result(0.8)})                # added, not overwritten
    write_results(second, "referit", "ck.pth", results={"test": result(0.7522)})
    assert paper_table.main([str(first), str(second), "--row", "HiVG-B"]) == 0
    header, _, ours, paper, diff = capsys.readouterr().out.strip().splitlines()
    cells = [c.strip() for c in ours.split("|")[2:-1]]
    assert header.split("|")[2].strip() == "RefCOCO val" and len(cells) == 10
    assert cells[:3] == ["87.32", "90.00", "80.00"] and cells[8] == "75.22" and cells[9] == "-"
    assert [c.strip() for c in diff.split("|")[2:-1]][:3] == ["+0.00", "+0.14", "-3.27"]
    assert "paper (HiVG-B)" in paper
    legacy = tmp_path / "old.json"
    legacy.write_text(json.dumps({"val": {"acc": 0.5, "count": 3}}))
    with pytest.raises(ValueError, match="keyed by split only"):
        paper_table.read_results([legacy])


def test_several_datasets_and_all_splits_in_one_command(setup, tmp_path):
    from eval import authors_eval_batch, eval_splits
    assert eval_splits("unc", ["all"]) == ["val", "testA", "testB"] and eval_splits("gref", ["all"]) == ["val"]
    assert eval_splits("unc", ["val"]) == ["val"]
    _, ckpt = setup
    proc = run(["--eval_model", str(ckpt), "--dataset", "synthref", "synthref", "--eval_set", "all",
                "--num_workers", "0", "--output_dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "eval_best_checkpoint.json").read_text())
    assert set(results["synthref"]) == {"val", "test"}
    assert "warning" not in proc.stderr                     # per-sample bridge: any batch is fine
    assert authors_eval_batch(load_model(ckpt).config) == 60


def test_official_bridge_at_another_batch_names_the_authors_batching(setup, tmp_path):
    _, ckpt = setup
    official = with_official_bridge(ckpt, tmp_path)
    proc = run(["--eval_model", str(official), "--eval_set", "val", "--num_workers", "0", "--batch_size", "5",
                "--output_dir", str(tmp_path)])
    assert proc.returncode == 0 and "the authors evaluated this kind of model at --batch_size 60" in proc.stderr


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_files_one_line_naming_the_flag(setup, tmp_path, capsys, kind):
    _, ckpt = setup
    path = write_bad_checkpoint(kind, tmp_path, ckpt)
    assert eval_main(["--eval_model", str(path), "--eval_set", "val", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eval.py: error: --eval_model {path} {BAD_CHECKPOINTS[kind]}") and err.count("\n") == 1, err
    assert "weights_only" not in err and not (tmp_path / "ran").exists()


def test_damaged_image_names_the_image_and_the_split_file(setup, tmp_path, capsys):
    """Read by DataLoader workers, which hand the error back with their traceback as its text: still one line."""
    root, ckpt = setup
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    image = copy / "synthref" / "images" / torch.load(copy / "synthref" / "synthref_val.pth", weights_only=True)[2][0]
    image.write_bytes(b"")
    assert eval_main(["--eval_model", str(ckpt), "--eval_set", "val", "--data_root", str(copy), "--split_root",
                      str(copy), "--num_workers", "2", "--batch_size", "4", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eval.py: error: image {image} (synthref val sample 2, split file "
                          f"{copy / 'synthref' / 'synthref_val.pth'}) cannot be read") and err.count("\n") == 1, err
    assert "python -m datasets.verify" in err


def test_blocks_beyond_the_clip_name_the_checkpoint_and_the_flags(tmp_path, capsys):
    from models.configs import load_model_config
    from predict import main as predict_main
    from train_hivg import resolve_args

    # Written before checkpoints carried their config: its layers come from its --model's config file today,
    # here tiny's bridges [1, 3, 5] over a stored 3-layer CLIP.
    tiny_args = add_model_args(argparse.ArgumentParser()).parse_args(["--model", "tiny", "--imsize", "64"])
    legacy = tmp_path / "legacy.pth"
    save_checkpoint(legacy, {"model": {}, "args": vars(tiny_args), "clip_cfg": load_model_config("demo")["clip"]})
    found = ": the blocks its run's --model tiny selects are not all in the CLIP stored with it: bridge layers " \
            "[1, 3, 5] out of range for the 3-layer vision tower"
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 24)).save(image)
    tools = (("eval.py", eval_main, "--eval_model", []),
             ("predict.py", predict_main, "--checkpoint", ["--image", str(image), "--text", "x"]))
    for prog, main, flag, extra in tools:
        assert main([flag, str(legacy), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{prog}: error: {flag} {legacy}{found}") and err.count("\n") == 1, err
    for flag in ("resume", "hi_lora_retrain", "retrain"):
        with pytest.raises(ValueError) as refused:
            resolve_args([f"--{flag}", str(legacy)])
        assert str(refused.value).startswith(f"--{flag} {legacy}{found}")
    # A run starting from a 3-layer model's checkpoint with another --model
    demo_args = add_model_args(argparse.ArgumentParser()).parse_args(["--model", "demo", "--imsize", "64"])
    demo = build_model(demo_args)
    start_from = tmp_path / "demo.pth"
    save_checkpoint(start_from, model_file(demo, vars(demo_args)))
    for flag in ("hi_lora_retrain", "retrain"):
        with pytest.raises(ValueError) as refused:
            resolve_args([f"--{flag}", str(start_from), "--model", "tiny", "--hi_lora_stage", "1"])
        assert str(refused.value) == (f"--model tiny selects blocks its CLIP, that of --{flag} {start_from}, does not "
                                      "have: bridge layers [1, 3, 5] out of range for the 3-layer vision tower; "
                                      "extract layers [1, 3, 5] out of range for the 3-layer vision tower; "
                                      "pass the --model that checkpoint was trained with")


def test_results_file_problems_are_refused_before_evaluating_and_nothing_is_lost(setup, tmp_path, capsys):
    _, ckpt = setup
    argv = ["--eval_model", str(ckpt), "--eval_set", "test", "--num_workers", "0"]
    out = tmp_path / "eval_best_checkpoint.json"
    truncated = '{"unc": {"val": {"acc": 0.5}}, "synthref": {"val"'
    out.write_text(truncated)
    assert eval_main([*argv, "--output_dir", str(tmp_path)]) == 2
    printed, err = capsys.readouterr()
    assert err.startswith(f"eval.py: error: results file {out} is not valid JSON") and err.count("\n") == 1, err
    assert f"mv {out} {out}.corrupt" in err and "--output_dir" in err
    assert "Acc@0.5" not in printed and out.read_text() == truncated
    unwritable = tmp_path / "a_file" / "out"           # a folder no one can create, root included
    (tmp_path / "a_file").write_text("")
    assert eval_main([*argv, "--output_dir", str(unwritable)]) == 2
    printed, err = capsys.readouterr()
    assert err == (f"eval.py: error: results file {unwritable / out.name} cannot be written (Not a directory); "
                   "pass --output_dir DIR, a folder you can write to\n") and "Acc@0.5" not in printed
    out.write_text(json.dumps({"unc": {"val": {"acc": 0.5}}}))
    before = out.stat().st_ino
    assert eval_main([*argv, "--output_dir", str(tmp_path)]) == 0
    results = json.loads(out.read_text())
    assert results["unc"] == {"val": {"acc": 0.5}} and results["synthref"]["test"]["count"] == 7
    assert out.stat().st_ino != before                 # replaced by a rename, never rewritten in place
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_synthetic_set_without_its_scenes_file_is_refused_before_evaluating(setup, tmp_path, capsys):
    root, ckpt = setup
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    scenes = copy / "synthref" / "synthref_test_scenes.json"
    scenes.unlink()
    assert eval_main(["--eval_model", str(ckpt), "--eval_set", "test", "--num_workers", "0", "--data_root",
                      str(copy), "--split_root", str(copy), "--output_dir", str(tmp_path)]) == 2
    printed, err = capsys.readouterr()
    assert err.startswith(f"eval.py: error: {scenes} does not exist") and err.count("\n") == 1, err
    assert f"python -m datasets.synthetic --out {copy}" in err and "Acc@0.5" not in printed


@pytest.mark.parametrize("flag,value,least", [("--visualize", "-2", 0), ("--batch_size", "0", 1),
                                              ("--num_workers", "-1", 0)])
def test_counts_out_of_range_are_refused(tmp_path, capsys, flag, value, least):
    with pytest.raises(SystemExit) as refused:
        eval_main(["--eval_model", str(tmp_path / "missing.pth"), flag, value])
    assert refused.value.code == 2
    assert capsys.readouterr().err.endswith(f"eval.py: error: {flag} must be at least {least}, got {value}\n")


@pytest.mark.parametrize("given", [False, True])
def test_split_file_opt_ins_reach_the_dataset(given):
    """--allow_outside_paths and --allow_unsafe_pickle are eval.py's too (one definition, datasets.refer)."""
    import eval as eval_tool
    flags = ["--eval_model", "m.pth"] + (["--allow_outside_paths", "--allow_unsafe_pickle"] if given else [])
    args = eval_tool.data_args(eval_tool.get_args_parser().parse_args(flags), {}, 64, dataset="unc")
    assert args.allow_outside_paths is given and args.allow_unsafe_pickle is given
