"""train_and_eval_script/recipe.sh: GPU count, skip / resume of stages, mode, multi-node and mixup evaluation,
checked on the commands it prints with DRY_RUN=1 (no training), and its stages on the tiny model."""
import os
import subprocess
import sys

import pytest
import torch

import train_hivg
from models.backbone import build_clip
from models.configs import load_model_config
from tests.conftest import REPO

RECIPE = REPO / "train_and_eval_script" / "recipe.sh"


def recipe(tmp_path, setting, dataset, gpus=None, status=0, **env):
    """Lines the recipe prints (stdout, or stderr when `status` is not 0); `gpus` puts a fake nvidia-smi listing
    that many GPUs first on the PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if gpus is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(gpus)))
        fake.chmod(0o755)
    full_env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NGPU")}
    full_env.update(PATH=f"{bin_dir}:/usr/bin:/bin", DRY_RUN="1", OUTPUT_ROOT=str(tmp_path / "out"), **env)
    proc = subprocess.run(["bash", str(RECIPE), setting, dataset], env=full_env, capture_output=True, text=True)
    assert proc.returncode == status, proc.stderr
    return (proc.stdout if status == 0 else proc.stderr).splitlines()


def commands(lines, script):
    return [line for line in lines if line.startswith("torchrun") and f" {script} " in line]


@pytest.mark.parametrize("gpus,visible,expected", [(8, None, 8), (8, "1,2,3,4,5,6,7", 7), (8, "0", 1), (None, None, 1)])
def test_one_process_per_gpu_the_job_may_use(tmp_path, gpus, visible, expected):
    env = {"CUDA_VISIBLE_DEVICES": visible} if visible else {}
    lines = recipe(tmp_path, "base", "unc", gpus=gpus, **env)
    assert all(f"--nproc_per_node {expected} --standalone" in c for c in commands(lines, "train_hivg.py"))


def test_finished_stages_are_skipped_and_an_interrupted_one_resumes(tmp_path):
    out = tmp_path / "out" / "base" / "unc"
    for name in ("stage0", "stage1"):
        (out / name).mkdir(parents=True)
    (out / "stage0" / "DONE").touch()
    (out / "stage1" / "checkpoint.pth").touch()
    lines = recipe(tmp_path, "base", "unc")
    train = commands(lines, "train_hivg.py")
    assert "finished earlier" in lines[lines.index("==================== base unc stage0 ====================") + 1]
    assert train[0].endswith(f"train_hivg.py --resume {out}/stage1/checkpoint.pth --num_workers 4")
    assert f"--hi_lora_retrain {out}/stage1/best_checkpoint.pth" in train[1] and len(train) == 3
    assert train[1].endswith(f"--output_dir {out}/stage2 --overwrite")   # a start that left no checkpoint.pth


def test_mode_multi_node_and_mixup_evaluation_on_five_datasets(tmp_path):
    lines = recipe(tmp_path, "mixup_base", "mixup", MODE="official", NNODES="2", NODE_RANK="1", NGPU="8",
                   RDZV_ENDPOINT="node0:29500")
    train, evals = commands(lines, "train_hivg.py"), commands(lines, "eval.py")
    assert all("--hi_lora_mode official --bridge_attention official" in c for c in train)
    assert all("--nnodes 2 --node_rank 1 --rdzv_backend c10d --rdzv_endpoint node0:29500" in c for c in train + evals)
    assert len(evals) == 4 and all("--dataset unc unc+ gref_umd referit flickr --eval_set all" in c for c in evals)
    assert all("--batch_size 64" in c for c in evals)
    env = {k: v for k, v in os.environ.items()}
    env.update(DRY_RUN="1", NNODES="2", OUTPUT_ROOT=str(tmp_path))
    proc = subprocess.run(["bash", str(RECIPE), "base", "unc"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "RDZV_ENDPOINT=host:port of node 0 is needed" in proc.stderr


def parsed(command):
    """The flags train_hivg.py gets from a printed command (argparse keeps the last value of a flag)."""
    words = command.split()
    return train_hivg.get_args_parser().parse_args(words[words.index("train_hivg.py") + 1:])


def test_extra_flags_win_over_the_recipes(tmp_path):
    lines = recipe(tmp_path, "base", "unc", EXTRA="--hi_lora_mode official --bridge_attention official --amp bf16")
    for command in commands(lines, "train_hivg.py"):
        args = parsed(command)
        assert (args.hi_lora_mode, args.bridge_attention, args.amp) == ("official", "official", "bf16"), command


def test_hi_lora_stage_refuses_a_mode_other_than_its_checkpoints(tiny, capsys):
    path = tiny[0]                                             # Hi LoRA stage 1, paper mode, per-sample bridge
    assert train_hivg.main(["--hi_lora_retrain", str(path), "--hi_lora_mode", "official",
                            "--bridge_attention", "official"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train_hivg.py: error: --hi_lora_retrain {path} was trained with --hi_lora_mode paper "
                          "--bridge_attention per_sample, this run gives --hi_lora_mode official --bridge_attention "
                          "official;") and "MODE=official" in err and err.count("\n") == 1, err


def test_each_stage_prints_its_global_batch_beside_the_authors_and_its_learning_rate_rule(tmp_path):
    lines = recipe(tmp_path, "base", "unc", gpus=8)
    assert ("global batch 640 = 8 GPUs x 80 per GPU (the authors: 560 = 7 GPUs x 80); learning rate 2.5e-4: the "
            "authors', not scaled (LR_SCALE=linear would scale it by 640/560)") in lines
    assert [parsed(c).lr for c in commands(lines, "train_hivg.py")] == [2.5e-4, 1e-4, 5e-5, 2.5e-5]
    lines = recipe(tmp_path, "base", "unc", gpus=7)
    assert "global batch 560 = 7 GPUs x 80 per GPU (the authors: 560 = 7 GPUs x 80); learning rate 2.5e-4: the " \
           "authors'" in lines
    lines = recipe(tmp_path, "base", "unc", gpus=8, BATCH="70", EPOCHS0="5", EPOCHS_LORA="2", LR_SCALE="linear",
                   EXTRA="--accum_steps 2")
    assert ("global batch 1120 = 8 GPUs x 70 per GPU x 2 accumulation steps (the authors: 560 = 7 GPUs x 80); "
            "learning rate 0.0005: 2.5e-4 x 1120/560 (LR_SCALE=linear)") in lines
    train = [parsed(c) for c in commands(lines, "train_hivg.py")]
    assert [(a.batch_size, a.epochs, a.accum_steps) for a in train] == [(70, 5, 2)] + [(70, 2, 2)] * 3
    assert [a.lr for a in train] == pytest.approx([2.5e-4 * 1120 / 560, 1e-4 * 1120 / 420, 5e-5 * 1120 / 420,
                                                   2.5e-5 * 1120 / 280], rel=1e-3)
    err = recipe(tmp_path, "base", "unc", status=2, EXTRA="--amp bf16 --batch_size 40")
    assert err == ["recipe.sh: error: EXTRA sets --batch_size; give the per-GPU batch as BATCH=N instead, so that "
                   "the global batch the stages print and LR_SCALE see it"]


# Flags that shrink each training run of the recipe to the tiny model, two epochs per stage.
TINY = "--model tiny --imsize 64 --max_query_len 16 --vl_enc_layers 1 --vl_dim_feedforward 64 --batch_size 8 " \
       "--device cpu --epochs 2"


@pytest.fixture
def tiny_recipe(synthetic_set, tmp_path):
    """Environment that runs the recipe on the tiny model and a tiny synthetic set: its PYTHON runs each torchrun
    command as one plain process and gives train_hivg.py the TINY flags last (they win)."""
    data = synthetic_set(16, 8, 8)
    torch.save(build_clip(load_model_config("tiny")["clip"]).state_dict(), tmp_path / "clip.pt")
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/sh
if [ "$1" = -m ] && [ "$2" = torch.distributed.run ]; then
    while [ "$1" != train_hivg.py ] && [ "$1" != eval.py ]; do shift; done
fi
if [ "$1" = train_hivg.py ]; then exec {sys.executable} "$@" {TINY}; fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "EXTRA", "DRY_RUN")}
    env.update(PYTHON=str(python), DATA_ROOT=str(data), SPLIT_ROOT=str(data), OUTPUT_ROOT=str(tmp_path / "out"),
               CLIP_B=str(tmp_path / "clip.pt"), NGPU="1", WORKERS="0", OMP_NUM_THREADS="1")
    return env


def test_a_stage_stopped_by_run_epochs_is_not_done_and_the_same_command_continues_it(tiny_recipe, tmp_path):
    out = tmp_path / "out" / "base" / "synthref"
    command = ["bash", str(RECIPE), "base", "synthref"]
    env = dict(tiny_recipe, EXTRA="--run_epochs 1")
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 3, first.stdout[-2000:] + first.stderr[-2000:]
    assert "recipe.sh: base synthref stage0 stopped with 1 of its 2 epochs trained; run the same command again" \
        in first.stderr
    assert not (out / "stage0" / "DONE").exists() and not (out / "stage1").exists()
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 3, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"resumed {out}/stage0/checkpoint.pth at epoch 1" in second.stdout
    assert (out / "stage0" / "DONE").exists() and not (out / "stage1" / "DONE").exists()
    assert "stage1 stopped with 1 of its 2 epochs trained" in second.stderr and not (out / "stage2").exists()


def test_task_res_trains_on_the_polygons_into_its_own_folder_and_is_refused_without_them(tmp_path):
    lines = recipe(tmp_path, "base", "unc", TASK="res")
    train = commands(lines, "train_hivg.py")
    assert parsed(train[0]).use_seg_mask and parsed(train[0]).use_mask_loss    # the stages inherit it
    assert all(f"{tmp_path}/out/base_res/unc/stage" in c for c in train)
    assert not any(parsed(c).use_seg_mask for c in commands(recipe(tmp_path, "base", "unc"), "train_hivg.py"))
    err = recipe(tmp_path, "base", "referit", status=2, TASK="res")
    assert err[0].startswith("recipe.sh: error: TASK=res trains masks on the objects' polygons, which the referit")
    script = (REPO / "train_and_eval_script" / "train_eval_large_unc_plus_res.sh").read_text()
    assert script.endswith('TASK=res exec bash "$(dirname "$0")/recipe.sh" large unc+\n')
