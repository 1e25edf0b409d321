"""README command 1's script, train_and_eval_script/demo.sh, end to end at a tiny size: every stage runs (two
training processes under torchrun, as on a 2-core machine) and the summary the README quotes (best val per stage,
test Acc@0.5 overall and per expression group) is printed."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
        assert any(re.fullmatch(rf"stage {stage}: best val Acc@0\.5 [01]\.\d{{4}}", line) for line in lines)
        assert (out / f"stage{stage}" / "best_checkpoint.pth").is_file()
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
