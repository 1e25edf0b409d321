"""README command 1's script, train_and_eval_script/demo.sh, end to end at a tiny size: every stage runs (two
training processes under torchrun, as on a 2-core machine) and the summary the README quotes (the val Acc@0.5 each
stage kept, test Acc@0.5 overall and per expression group) is printed."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "train_and_eval_script" / "demo.sh"


def test_demo_script_runs_every_stage_and_prints_its_summary(tmp_path):
    out = tmp_path / "demo"
    stale = out / "data" / "synthref"                     # a set left by an older generator, without the stamp
    stale.mkdir(parents=True)
    (stale / "synthref_test.pth").write_bytes(b"stale")
    env = dict(os.environ, PYTHON=sys.executable, OUTPUT_DIR=str(out), NUM_TRAIN="64", EPOCHS0="1",
               EPOCH_SAMPLES="64", LORA_SAMPLES="32", BATCH="16", NPROC="2")
    proc = subprocess.run(["bash", "train_and_eval_script/demo.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "attributes only | location or relation" in proc.stdout                  # baselines by group
    for stage in range(4):
        kept = torch.load(out / f"stage{stage}" / "best_checkpoint.pth", map_location="cpu", weights_only=True)
        assert any(re.fullmatch(rf"stage {stage}: best val Acc@0\.5 {kept['best_acc']:.4f} \((epoch \d+|the model "
                                r"it inherited)\)", line) for line in lines), lines[-8:]
    tail = lines[-3:]
    assert re.fullmatch(r"test Acc@0\.5: [01]\.\d{4}", tail[0])
    assert re.fullmatch(r"test Acc@0\.5 attributes only: [01]\.\d{4} \(\d+ expressions\)", tail[1])
    assert re.fullmatch(r"test Acc@0\.5 location or relation: [01]\.\d{4} \(\d+ expressions\)", tail[2])
    counts = [int(re.search(r"\((\d+) expressions", line).group(1)) for line in tail[1:]]
    assert sum(counts) == 500                                  # the whole test split, of a regenerated set
    assert (out / "data" / "demo_data.txt").read_text().startswith("num_train=64 refs_per_image=3 generator=")
    assert (out / "predict.png").is_file() and len(list((out / "stage3").glob("vis_*/*.png"))) == 12


def test_demo_refuses_a_batch_that_does_not_split_over_its_processes(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHON=sys.executable, OUTPUT_DIR=str(out), NPROC="3", BATCH="64")
    proc = subprocess.run(["bash", "train_and_eval_script/demo.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "BATCH=64 does not split over NPROC=3" in proc.stderr
    assert not out.exists()                                                        # refused before any work
    proc = subprocess.run(["bash", "train_and_eval_script/demo.sh"], cwd=REPO, env=dict(env, TASK="seg", NPROC="2"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "TASK=seg is not rec (boxes) or res (segmentation masks)" in proc.stderr
    assert not out.exists()


def summary_lines_of_the_demo():
    """The lines of demo.sh that print what each stage reached (after its timing line, before the test accuracy)."""
    lines = DEMO.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('echo "demo finished in'))
    end = next(i for i, line in enumerate(lines) if line.startswith('grep "^test Acc@0.5"'))
    return "\n".join(lines[start + 1:end])


def test_summary_gives_the_val_accuracy_of_the_checkpoint_each_stage_kept(tmp_path):
    # best_acc and epoch of each stage's best_checkpoint.pth (-1: the inherited model, evaluated before the first
    # epoch), and the val Acc@0.5 of the epochs in its log.txt: stages 1-2 kept the model they inherited
    kept = {0: (0.7233, 1), 1: (0.7233, -1), 2: (0.7233, -1), 3: (0.7300, 0)}
    logged = {0: [0.7000, 0.7233], 1: [0.7100], 2: [0.7100], 3: [0.7300]}
    for stage, (best_acc, epoch) in kept.items():
        folder = tmp_path / f"stage{stage}"
        folder.mkdir()
        torch.save({"best_acc": best_acc, "epoch": epoch}, folder / "best_checkpoint.pth")
        (folder / "log.txt").write_text("".join(json.dumps({"epoch": e, "val_acc": acc}) + "\n"
                                                for e, acc in enumerate(logged[stage])))
    env = dict(os.environ, PYTHON=sys.executable, OUTPUT_DIR=str(tmp_path), LORA_STAGES="3")
    proc = subprocess.run(["bash", "-c", summary_lines_of_the_demo()], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"stage {stage}: best val Acc@0.5 {best_acc:.4f}"
                                                       for stage, (best_acc, _) in kept.items()]
    assert [line.split(" (")[1] for line in lines] == ["epoch 1)", "the model it inherited)",
                                                       "the model it inherited)", "epoch 0)"]
