#!/usr/bin/env bash
# The whole staged HiVG recipe of the paper (README, "Training and evaluation") for one dataset and setting, then evaluation on
# every split. Usage: recipe.sh SETTING DATASET, SETTING one of base, large, mixup_base, mixup_large.
# Environment (defaults in brackets): DATA_ROOT [./data/image_data], SPLIT_ROOT [./data/pseudo_samples],
# OUTPUT_ROOT [./outputs], CLIP_B [./checkpoints/clip_b_ml_cascade_maskrcnn_model_224.pth],
# CLIP_L [./checkpoints/clip_l_ml_cascade_maskrcnn_model_224.pth], NGPU [visible GPUs, else 1],
# WORKERS [4], PYTHON [python], EXTRA [extra flags for every training run, e.g. "--amp bf16"].
set -euo pipefail
cd "$(dirname "$0")/.."
SETTING=$1 DATASET=$2
DATA_ROOT=${DATA_ROOT:-./data/image_data}
SPLIT_ROOT=${SPLIT_ROOT:-./data/pseudo_samples}
OUTPUT_ROOT=${OUTPUT_ROOT:-./outputs}
CLIP_B=${CLIP_B:-./checkpoints/clip_b_ml_cascade_maskrcnn_model_224.pth}
CLIP_L=${CLIP_L:-./checkpoints/clip_l_ml_cascade_maskrcnn_model_224.pth}
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NGPU=$(( NGPU > 0 ? NGPU : 1 ))
WORKERS=${WORKERS:-4}
PYTHON=${PYTHON:-python}
read -r -a EXTRA <<< "${EXTRA:-}"
OUT=$OUTPUT_ROOT/$SETTING/$DATASET

case $DATASET in
    unc|unc+) SPLITS="val testA testB" ;;
    gref) SPLITS="val" ;;
    *) SPLITS="val test" ;;
esac
short=0; [ "$DATASET" = flickr ] && short=1
case $SETTING in
    base)        MODEL=ViT-B/16; CLIP=$CLIP_B; WARM=""; E0=$(( short ? 30 : 60 )); EL=$(( short ? 5 : 20 ))
                 B0=80; BL=(60 60 40); LRS=(1e-4 5e-5 2.5e-5); MODE=(--enable_adaptive_weights) ;;
    large)       MODEL=ViT-L/14; CLIP=$CLIP_L; WARM=$([ "$DATASET" = referit ] && echo 5 || echo 10)
                 E0=$(( short ? 30 : 60 )); EL=$(( short ? 5 : 10 )); B0=32; BL=(32 32 32); LRS=(1e-4 5e-5 2.5e-5)
                 MODE=(--enable_adaptive_weights) ;;
    mixup_base)  MODEL=ViT-B/16; CLIP=$CLIP_B; WARM=""; E0=60; EL=20; B0=64; BL=(64 64 64); LRS=(1e-4 5e-5 2e-5)
                 MODE=(--mixup_pretrain --no-enable_adaptive_weights) ;;
    mixup_large) MODEL=ViT-L/14; CLIP=$CLIP_L; WARM=10; E0=30; EL=10; B0=32; BL=(32 32 32); LRS=(1e-4 5e-5 2e-5)
                 MODE=(--mixup_pretrain --no-enable_adaptive_weights) ;;
    *) echo "unknown setting $SETTING (base, large, mixup_base, mixup_large)" >&2; exit 2 ;;
esac

run() { "$PYTHON" -m torch.distributed.run --nproc_per_node "$NGPU" --standalone "$@"; }
COMMON=(--num_workers "$WORKERS" --lr_scheduler cosine --aug_crop --aug_scale --aug_translate "${EXTRA[@]}")
MODEL_FLAGS=(--model "$MODEL" --dataset "$DATASET" --data_root "$DATA_ROOT" --split_root "$SPLIT_ROOT" --imsize 224
             --max_query_len 77 --normalize_before "${MODE[@]}" --use_contrastive_loss --use_rtcc_constrain_loss
             --use_mask_loss)
START=(--clip_model "$CLIP")
if [ -n "$WARM" ]; then
    echo "==================== $SETTING $DATASET warmup (no bridges) ===================="
    run train_hivg.py "${COMMON[@]}" "${MODEL_FLAGS[@]}" --warmup --clip_model "$CLIP" --epochs "$WARM" \
        --lr 2.5e-4 --batch_size 32 --output_dir "$OUT/warmup"
    START=(--retrain "$OUT/warmup/best_checkpoint.pth")
fi
echo "==================== $SETTING $DATASET stage 0 ===================="
run train_hivg.py "${COMMON[@]}" "${MODEL_FLAGS[@]}" "${START[@]}" --epochs "$E0" --lr 2.5e-4 --batch_size "$B0" \
    --output_dir "$OUT/stage0"
for stage in 1 2 3; do
    echo "==================== $SETTING $DATASET Hi LoRA stage $stage ===================="
    run train_hivg.py "${COMMON[@]}" --hi_lora_retrain "$OUT/stage$(( stage - 1 ))/best_checkpoint.pth" \
        --epochs "$EL" --lr "${LRS[stage-1]}" --batch_size "${BL[stage-1]}" --output_dir "$OUT/stage$stage"
done
for dir in stage0 stage1 stage2 stage3; do
    # shellcheck disable=SC2086
    run eval.py --num_workers "$WORKERS" --batch_size 64 --eval_model "$OUT/$dir/best_checkpoint.pth" --eval_set $SPLITS
done
