#!/usr/bin/env bash
# The whole staged HiVG recipe (README, "Training and evaluation") for one dataset and setting, then evaluation
# on every split (a mixup model on the five datasets of the paper's table). Usage: recipe.sh SETTING DATASET,
# SETTING one of base, large, mixup_base, mixup_large.
#
# A finished stage (its folder holds DONE) is skipped; an interrupted one continues from its checkpoint.pth. A
# stage that stops before its last epoch (--run_epochs in EXTRA) ends the script with status 3 and a message; the
# same command continues it.
# Environment (defaults in brackets): DATA_ROOT [./data/image_data], SPLIT_ROOT [./data/pseudo_samples],
# OUTPUT_ROOT [./outputs], CLIP_B [./checkpoints/clip_b_ml_cascade_maskrcnn_model_224.pth],
# CLIP_L [./checkpoints/clip_l_ml_cascade_maskrcnn_model_224.pth], MODE [paper; official: the authors' Hi LoRA
# layout and batch-mixing bridge, which their numbers come from], NGPU [the GPUs CUDA_VISIBLE_DEVICES lists,
# else all of nvidia-smi's, else 1], NNODES [1], NODE_RANK [0], RDZV_ENDPOINT [host:port of node 0, for
# NNODES > 1], RDZV_ID [hivg], WORKERS [4], PYTHON [.venv/bin/python if present, else python],
# EXTRA [extra flags for every training run, e.g. "--amp bf16"; they come last, so they win over the recipe's],
# DRY_RUN [1: print the commands only].
set -euo pipefail
cd "$(dirname "$0")/.."
SETTING=$1 DATASET=$2
DATA_ROOT=${DATA_ROOT:-./data/image_data}
SPLIT_ROOT=${SPLIT_ROOT:-./data/pseudo_samples}
OUTPUT_ROOT=${OUTPUT_ROOT:-./outputs}
CLIP_B=${CLIP_B:-./checkpoints/clip_b_ml_cascade_maskrcnn_model_224.pth}
CLIP_L=${CLIP_L:-./checkpoints/clip_l_ml_cascade_maskrcnn_model_224.pth}
MODE=${MODE:-paper}
WORKERS=${WORKERS:-4}
NNODES=${NNODES:-1}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
read -r -a EXTRA <<< "${EXTRA:-}"
OUT=$OUTPUT_ROOT/$SETTING/$DATASET

if [ -z "${NGPU:-}" ]; then   # torchrun starts one process per GPU: count the ones this job may use
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
        NGPU=${#visible[@]}
    else
        NGPU=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
    fi
fi
NGPU=$(( NGPU > 0 ? NGPU : 1 ))
case $MODE in
    paper) MODE_FLAGS=(--hi_lora_mode paper --bridge_attention per_sample) ;;
    official) MODE_FLAGS=(--hi_lora_mode official --bridge_attention official) ;;
    *) echo "MODE must be paper or official, got $MODE" >&2; exit 2 ;;
esac

short=0; [ "$DATASET" = flickr ] && short=1
case $SETTING in
    base)        MODEL=ViT-B/16; CLIP=$CLIP_B; WARM=""; E0=$(( short ? 30 : 60 )); EL=$(( short ? 5 : 20 ))
                 B0=80; BL=(60 60 40); LRS=(1e-4 5e-5 2.5e-5); BRIDGE=(--enable_adaptive_weights); EVAL_B=60 ;;
    large)       MODEL=ViT-L/14; CLIP=$CLIP_L; WARM=$([ "$DATASET" = referit ] && echo 5 || echo 10)
                 E0=$(( short ? 30 : 60 )); EL=$(( short ? 5 : 10 )); B0=32; BL=(32 32 32); LRS=(1e-4 5e-5 2.5e-5)
                 BRIDGE=(--enable_adaptive_weights); EVAL_B=32 ;;
    mixup_base)  MODEL=ViT-B/16; CLIP=$CLIP_B; WARM=""; E0=60; EL=20; B0=64; BL=(64 64 64); LRS=(1e-4 5e-5 2e-5)
                 BRIDGE=(--mixup_pretrain --no-enable_adaptive_weights); EVAL_B=64 ;;
    mixup_large) MODEL=ViT-L/14; CLIP=$CLIP_L; WARM=10; E0=30; EL=10; B0=32; BL=(32 32 32); LRS=(1e-4 5e-5 2e-5)
                 BRIDGE=(--mixup_pretrain --no-enable_adaptive_weights); EVAL_B=64 ;;
    *) echo "unknown setting $SETTING (base, large, mixup_base, mixup_large)" >&2; exit 2 ;;
esac
EVAL_DATA=(--dataset "$DATASET")
[ "$DATASET" = mixup ] && EVAL_DATA=(--dataset unc unc+ gref_umd referit flickr)

LAUNCH=(--nproc_per_node "$NGPU")
if [ "$NNODES" -gt 1 ]; then
    LAUNCH+=(--nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --rdzv_backend c10d
             --rdzv_endpoint "${RDZV_ENDPOINT:?RDZV_ENDPOINT=host:port of node 0 is needed when NNODES > 1}"
             --rdzv_id "${RDZV_ID:-hivg}")
else
    LAUNCH+=(--standalone)
fi
run() {
    if [ "${DRY_RUN:-0}" = 1 ]; then echo "torchrun ${LAUNCH[*]} $*"; else "$PYTHON" -m torch.distributed.run "${LAUNCH[@]}" "$@"; fi
}

# stage NAME FLAGS...: skipped when done, resumed when interrupted, else run from the start.
stage() {
    local dir=$OUT/$1; shift
    echo "==================== $SETTING $DATASET $(basename "$dir") ===================="
    if [ -f "$dir/DONE" ]; then
        echo "finished earlier ($dir/DONE): skipped"
        return
    elif [ -f "$dir/checkpoint.pth" ]; then
        run train_hivg.py --resume "$dir/checkpoint.pth" --num_workers "$WORKERS" "${EXTRA[@]}"
    else  # no checkpoint.pth: whatever an interrupted start left there is replaced
        run train_hivg.py "$@" --output_dir "$dir" --overwrite "${EXTRA[@]}"   # last: argparse keeps the last value
    fi
    if [ "${DRY_RUN:-0}" != 1 ]; then mark_done "$dir"; fi
}

# mark_done DIR: DONE only once checkpoint.pth has reached the stage's --epochs (--run_epochs stops a run earlier).
mark_done() {
    local progress trained epochs
    progress=$("$PYTHON" -c 'import sys, torch
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=True, mmap=True)
print(ckpt["resume_at"][0], ckpt["args"]["epochs"])' "$1/checkpoint.pth")
    read -r trained epochs <<< "$progress"
    if [ "$trained" -lt "$epochs" ]; then
        echo "recipe.sh: $SETTING $DATASET $(basename "$1") stopped with $trained of its $epochs epochs trained;" \
             "run the same command again to continue it from $1/checkpoint.pth" >&2
        exit 3
    fi
    touch "$1/DONE"
}

COMMON=(--num_workers "$WORKERS" --lr_scheduler cosine --aug_crop --aug_scale --aug_translate)
MODEL_FLAGS=(--model "$MODEL" --dataset "$DATASET" --data_root "$DATA_ROOT" --split_root "$SPLIT_ROOT" --imsize 224
             --max_query_len 77 --normalize_before "${BRIDGE[@]}" "${MODE_FLAGS[@]}" --use_contrastive_loss
             --use_rtcc_constrain_loss --use_mask_loss)
START=(--clip_model "$CLIP")
if [ -n "$WARM" ]; then
    stage warmup "${COMMON[@]}" "${MODEL_FLAGS[@]}" --warmup --clip_model "$CLIP" --epochs "$WARM" --lr 2.5e-4 \
        --batch_size 32
    START=(--retrain "$OUT/warmup/best_checkpoint.pth")
fi
stage stage0 "${COMMON[@]}" "${MODEL_FLAGS[@]}" "${START[@]}" --epochs "$E0" --lr 2.5e-4 --batch_size "$B0"
for k in 1 2 3; do
    stage "stage$k" "${COMMON[@]}" --hi_lora_retrain "$OUT/stage$(( k - 1 ))/best_checkpoint.pth" --epochs "$EL" \
        --lr "${LRS[k-1]}" --batch_size "${BL[k-1]}"
done
for dir in stage0 stage1 stage2 stage3; do
    run eval.py --num_workers "$WORKERS" --batch_size "$EVAL_B" --eval_model "$OUT/$dir/best_checkpoint.pth" \
        "${EVAL_DATA[@]}" --eval_set all
done
