#!/usr/bin/env bash
# The whole staged HiVG recipe (README, "Training and evaluation") for one dataset and setting, then evaluation
# on every split (a mixup model on the five datasets of the paper's table). Usage: recipe.sh SETTING DATASET,
# SETTING one of base, large, mixup_base, mixup_large; DATASET one of the authors' sets or jsonl, a dataset of your own
# (README "Train on your own data"; train_eval_custom.sh).
#
# A finished stage (its folder holds DONE) is skipped; an interrupted one continues from its checkpoint.pth. A
# stage that stops before its last epoch (--run_epochs in EXTRA) ends the script with status 3 and a message; the
# same command continues it.
#
# Environment (defaults in brackets): DATA_ROOT [./data/image_data], SPLIT_ROOT [./data/pseudo_samples],
# OUTPUT_ROOT [./outputs], CLIP_B [./checkpoints/clip_b_ml_cascade_maskrcnn_model_224.pth],
# CLIP_L [./checkpoints/clip_l_ml_cascade_maskrcnn_model_224.pth], MODE [paper; official: the authors' Hi LoRA
# layout and batch-mixing bridge, which their numbers come from], NGPU [the GPUs CUDA_VISIBLE_DEVICES lists,
# else all of nvidia-smi's, else 1], NNODES [1], NODE_RANK [0], RDZV_ENDPOINT [host:port of node 0, for
# NNODES > 1], RDZV_ID [hivg], WORKERS [4], PYTHON [.venv/bin/python if present, else python],
# EXTRA [extra flags for every training run, e.g. "--amp bf16"; they come last, so they win over the recipe's;
# --batch_size is refused there: use BATCH], BATCH [per-GPU batch of every training run; default the authors',
# stage by stage], EPOCHS0 [epochs of stage 0], EPOCHS_LORA [epochs of each Hi LoRA stage; both default to the
# authors'], LR_SCALE [none: the authors' learning rates; linear: scaled by global batch / the authors' global
# batch], TASK [rec: boxes; res: referring image segmentation, the same schedule with the segmentation head
# supervised by the COCO polygons (--use_seg_mask), into OUTPUT_ROOT/SETTING_res; refused for referit and flickr,
# whose split files have no polygons], DRY_RUN [1: print the commands only], TEXT_LAYERS [last, middle_last or all:
# the text blocks feeding the bridges; default the dataset's rule, last for jsonl].
#
# Batch sizes are per GPU, as in the authors' scripts, which ran 7 GPUs: on another number of GPUs (or with BATCH, or
# --accum_steps in EXTRA) the global batch differs from theirs (8 GPUs x 80 = 640 where they trained at 7 x 80 =
# 560). Each stage prints its global batch beside the authors' and the learning rate it uses, by LR_SCALE.
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
LR_SCALE=${LR_SCALE:-none}
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
TASK=${TASK:-rec}
read -r -a EXTRA <<< "${EXTRA:-}"

if [ -z "${NGPU:-}" ]; then   # torchrun starts one process per GPU: count the ones this job may use
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
        NGPU=${#visible[@]}
    else
        NGPU=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
    fi
fi
NGPU=$(( NGPU > 0 ? NGPU : 1 ))
AUTHORS_GPUS=7   # every training script of the authors runs 7 processes, one per GPU
ACCUM=1          # the global batch counts EXTRA's --accum_steps; its --batch_size or --lr would bypass BATCH, LR_SCALE
for i in "${!EXTRA[@]}"; do
    case ${EXTRA[i]} in
        --accum_steps) ACCUM=${EXTRA[i+1]:-1} ;;
        --accum_steps=*) ACCUM=${EXTRA[i]#*=} ;;
        --batch_size|--batch_size=*)
            echo "recipe.sh: error: EXTRA sets --batch_size; give the per-GPU batch as BATCH=N instead, so that the" \
                 "global batch the stages print and LR_SCALE see it" >&2
            exit 2 ;;
        --lr|--lr=*)
            if [ "$LR_SCALE" != none ]; then
                echo "recipe.sh: error: EXTRA's --lr would replace the learning rates LR_SCALE=$LR_SCALE scales;" \
                     "drop one of them" >&2
                exit 2
            fi ;;
    esac
done
case $LR_SCALE in
    none|linear) ;;
    *) echo "LR_SCALE must be none or linear, got $LR_SCALE" >&2; exit 2 ;;
esac
case $MODE in
    paper) MODE_FLAGS=(--hi_lora_mode paper --bridge_attention per_sample) ;;
    official) MODE_FLAGS=(--hi_lora_mode official --bridge_attention official) ;;
    *) echo "MODE must be paper or official, got $MODE" >&2; exit 2 ;;
esac
case $TASK:$DATASET in
    rec:*) SEG=(); OUT=$OUTPUT_ROOT/$SETTING/$DATASET ;;
    res:referit|res:flickr)
        echo "recipe.sh: error: TASK=res trains masks on the objects' polygons, which the $DATASET split files do not" \
             "have (the COCO-based unc, unc+, gref and gref_umd do, and the COCO part of mixup); use TASK=rec" >&2
        exit 2 ;;
    res:*) SEG=(--use_seg_mask); OUT=$OUTPUT_ROOT/${SETTING}_res/$DATASET ;;
    *) echo "TASK must be rec (boxes) or res (segmentation masks), got $TASK" >&2; exit 2 ;;
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
E0=${EPOCHS0:-$E0} EL=${EPOCHS_LORA:-$EL}
EVAL_DATA=(--dataset "$DATASET")
[ "$DATASET" = mixup ] && EVAL_DATA=(--dataset unc unc+ gref_umd referit flickr)

WORLD=$(( NGPU * NNODES ))
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

# stage NAME AUTHORS_BATCH AUTHORS_LR FLAGS...: skipped when done, resumed when interrupted, else run from the start
# at BATCH per GPU (default AUTHORS_BATCH) and the learning rate LR_SCALE gives.
stage() {
    local dir=$OUT/$1 authors_batch=$2 authors_lr=$3; shift 3
    echo "==================== $SETTING $DATASET $(basename "$dir") ===================="
    if [ -f "$dir/DONE" ]; then
        echo "finished earlier ($dir/DONE): skipped"
        return
    elif [ -f "$dir/checkpoint.pth" ]; then
        run train_hivg.py --resume "$dir/checkpoint.pth" --num_workers "$WORKERS" "${EXTRA[@]}"
    else  # no checkpoint.pth: whatever an interrupted start left there is replaced
        local batch=${BATCH:-$authors_batch} lr=$authors_lr rule="the authors'" accum=""
        local global=$(( WORLD * batch * ACCUM )) authors=$(( AUTHORS_GPUS * authors_batch ))
        if [ "$LR_SCALE" = linear ]; then
            lr=$(awk -v lr="$authors_lr" -v g="$global" -v a="$authors" 'BEGIN { printf "%.4g", lr * g / a }')
            rule="$authors_lr x $global/$authors (LR_SCALE=linear)"
        elif [ "$global" != "$authors" ]; then
            rule="the authors', not scaled (LR_SCALE=linear would scale it by $global/$authors)"
        fi
        [ "$ACCUM" = 1 ] || accum=" x $ACCUM accumulation steps"
        echo "global batch $global = $WORLD GPUs x $batch per GPU$accum" \
             "(the authors: $authors = $AUTHORS_GPUS GPUs x $authors_batch); learning rate $lr: $rule"
        run train_hivg.py "$@" --lr "$lr" --batch_size "$batch" --output_dir "$dir" --overwrite "${EXTRA[@]}"
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

# MODE on every stage: a Hi LoRA stage refuses a mode other than its checkpoint's (a rerun with another MODE)
COMMON=(--num_workers "$WORKERS" --lr_scheduler cosine --aug_crop --aug_scale --aug_translate "${MODE_FLAGS[@]}")
MODEL_FLAGS=(--model "$MODEL" --dataset "$DATASET" --data_root "$DATA_ROOT" --split_root "$SPLIT_ROOT" --imsize 224
             --max_query_len 77 --normalize_before "${BRIDGE[@]}" --use_contrastive_loss --use_rtcc_constrain_loss
             --use_mask_loss ${TEXT_LAYERS:+--text_layers "$TEXT_LAYERS"} ${SEG[@]+"${SEG[@]}"})
START=(--clip_model "$CLIP")
if [ -n "$WARM" ]; then
    stage warmup 32 2.5e-4 "${COMMON[@]}" "${MODEL_FLAGS[@]}" --warmup --clip_model "$CLIP" --epochs "$WARM"
    START=(--retrain "$OUT/warmup/best_checkpoint.pth")
fi
stage stage0 "$B0" 2.5e-4 "${COMMON[@]}" "${MODEL_FLAGS[@]}" "${START[@]}" --epochs "$E0"
for k in 1 2 3; do
    stage "stage$k" "${BL[k-1]}" "${LRS[k-1]}" "${COMMON[@]}" \
        --hi_lora_retrain "$OUT/stage$(( k - 1 ))/best_checkpoint.pth" --epochs "$EL"
done
for dir in stage0 stage1 stage2 stage3; do
    run eval.py --num_workers "$WORKERS" --batch_size "$EVAL_B" --eval_model "$OUT/$dir/best_checkpoint.pth" \
        "${EVAL_DATA[@]}" --eval_set all
done
