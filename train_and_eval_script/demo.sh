#!/usr/bin/env bash
# The embedded demo: the whole HiVG recipe (stage 0, then Hi LoRA stages 1-3) of a tiny model on the
# synthetic set, on CPU, then evaluation. Everything goes under $OUTPUT_DIR (default outputs/demo).
#
#   bash train_and_eval_script/demo.sh
#
# The generated set holds NUM_TRAIN training expressions, REFS_PER_IMAGE per image.
# The demo model (models/configs/demo.json) is a random CLIP whose vision position embedding starts as a
# 2-D sine-cosine table (temperature 100, 3x the patch features' scale): with open_clip's random init
# the box regressor cannot read positions; its patch projection starts as a 2-D DCT of luminance and two
# colour axes, which keeps the objects' outlines readable (models/random_init.py). It is kept small for
# 2 CPU cores: 3 frozen vision blocks of width 64, bridges in the last two (backward stops at the first;
# one bridge, in the last block only, reads the shapes worse: docs/demo.md), a 3-layer fusion encoder
# (FFN 256) without dropout, batch 32 split over one training process per core (torchrun, gloo). The
# model is still learning when the schedule ends, so optimizer steps count: batch 64 trains 18% faster per
# sample but ends about 0.4 higher in loss (docs/demo.md). Stage 0 sees EPOCHS0
# epochs of EPOCH_SAMPLES samples drawn afresh from the generated set each epoch (0: the whole set), so
# the cosine schedule steps every EPOCH_SAMPLES; at this scale the number of distinct samples decides
# the accuracy (a larger generated set beats more passes over a small one). Each Hi LoRA stage trains
# one epoch drawn from the set at low learning rates (1e-4, 5e-5, 2.5e-5) so that it refines the
# previous stage instead of knocking it off its minimum, of LORA_SAMPLES samples only: at this scale the
# stages add little over stage 0 (README, measured). The last lines give the val Acc@0.5 of the checkpoint
# each stage kept (its best epoch, or the model it inherited) and the test Acc@0.5, overall and for the
# expressions that colour/shape/size words resolve or that need location or relation words (README, "Quick start").
#
#   TASK=res bash train_and_eval_script/demo.sh
#
# is the segmentation demo (README, "Referring image segmentation"): the segmentation head supervised with the
# objects' polygons (--use_seg_mask), a shorter schedule (stage 0 of EPOCHS0=4 epochs, then Hi LoRA stage 1
# only), into outputs/demo_res; it ends with the test mask mIoU and oIoU and the mIoU of the predicted box filled
# as a mask.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
TASK=${TASK:-rec}
case $TASK in
    rec) SEG=(); : "${OUTPUT_DIR:=outputs/demo}" "${EPOCHS0:=6}" "${LORA_STAGES:=3}" ;;
    res) SEG=(--use_seg_mask); : "${OUTPUT_DIR:=outputs/demo_res}" "${EPOCHS0:=4}" "${LORA_STAGES:=1}" ;;
    *) echo "demo.sh: TASK=$TASK is not rec (boxes) or res (segmentation masks)" >&2; exit 2 ;;
esac
DATA_DIR=${DATA_DIR:-$OUTPUT_DIR/data}
NUM_TRAIN=${NUM_TRAIN:-96000}
REFS_PER_IMAGE=${REFS_PER_IMAGE:-3}
EPOCH_SAMPLES=${EPOCH_SAMPLES:-24000}
EPOCHS_LORA=${EPOCHS_LORA:-1}
LORA_SAMPLES=${LORA_SAMPLES:-1600}
BATCH=${BATCH:-32}
WORKERS=${WORKERS:-0}
NPROC=${NPROC:-$(nproc)}                     # training ranks: one per core (torchrun, gloo), 8 at most
NPROC=$(( NPROC > 8 ? 8 : NPROC ))
if (( BATCH % NPROC )); then
    echo "demo.sh: BATCH=$BATCH does not split over NPROC=$NPROC training processes; set NPROC or BATCH" >&2
    exit 2
fi
if (( NPROC > 1 )); then   # one single-threaded process per core beats one process on every core (README)
    TRAIN=(env OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" train_hivg.py)
else
    TRAIN=("$PYTHON" train_hivg.py)
fi
start=$(date +%s)

# A rerun reuses the set only if this generator made it with these settings (a stamp file says so).
DATA_KEY="num_train=$NUM_TRAIN refs_per_image=$REFS_PER_IMAGE generator=$(cat datasets/synthetic.py \
    datasets/synthref_lang.py datasets/masks.py | sha256sum | cut -c1-16)"
if [ "$(cat "$DATA_DIR/demo_data.txt" 2>/dev/null)" != "$DATA_KEY" ]; then
    "$PYTHON" -m datasets.synthetic --out "$DATA_DIR" --num_train "$NUM_TRAIN" --num_val 300 --num_test 500 --imsize 64 \
        --refs_per_image "$REFS_PER_IMAGE"
    echo "$DATA_KEY" > "$DATA_DIR/demo_data.txt"
fi
"$PYTHON" -m datasets.synthetic --baseline "$DATA_DIR" --split test

COMMON=(--device cpu --num_workers "$WORKERS" --batch_size $(( BATCH / NPROC )) --lr_scheduler cosine --overwrite)  # a rerun replaces the demo
"${TRAIN[@]}" "${COMMON[@]}" --model demo --dataset synthref --data_root "$DATA_DIR" --split_root "$DATA_DIR" \
    --imsize 64 --max_query_len 16 --vl_enc_layers 3 --vl_nheads 4 --vl_dim_feedforward 256 --vl_dropout 0 \
    --normalize_before --enable_adaptive_weights --use_rtcc_constrain_loss --use_mask_loss ${SEG[@]+"${SEG[@]}"} \
    --epochs "$EPOCHS0" --epoch_samples "$EPOCH_SAMPLES" --lr 1e-3 --output_dir "$OUTPUT_DIR/stage0"
prev=$OUTPUT_DIR/stage0
for stage in $(seq 1 "$LORA_STAGES"); do
    lr=$(awk -v s="$stage" 'BEGIN { print 1e-4 / 2 ^ (s - 1) }')
    "${TRAIN[@]}" "${COMMON[@]}" --hi_lora_retrain "$prev/best_checkpoint.pth" \
        --epochs "$EPOCHS_LORA" --epoch_samples "$LORA_SAMPLES" --lr "$lr" --output_dir "$OUTPUT_DIR/stage$stage"
    prev=$OUTPUT_DIR/stage$stage
done
"$PYTHON" eval.py --device cpu --num_workers "$WORKERS" --eval_model "$prev/best_checkpoint.pth" --eval_set val test --visualize 6 \
    | tee "$OUTPUT_DIR/eval.txt"
# One picture of what the model sees: the first test image with its own expression.
read -r IMAGE TEXT < <("$PYTHON" -c "import torch; r = torch.load('$DATA_DIR/synthref/synthref_test.pth', weights_only=True)[0]; print(r[0], r[3])")
"$PYTHON" predict.py --device cpu --checkpoint "$prev/best_checkpoint.pth" --image "$DATA_DIR/synthref/images/$IMAGE" \
    --text "$TEXT" --heatmap --out "$OUTPUT_DIR/predict.png"
echo "demo finished in $(( $(date +%s) - start ))s"
# What each stage kept, read from its best_checkpoint.pth: a Hi LoRA stage starts it with the model it inherits,
# evaluated before its first epoch (so not in its log.txt), and keeps that model unless an epoch beats it.
"$PYTHON" -c 'import sys, torch
for stage in range(int(sys.argv[2]) + 1):
    ckpt = torch.load(f"{sys.argv[1]}/stage{stage}/best_checkpoint.pth", map_location="cpu", weights_only=True)
    epoch, acc = ckpt["epoch"], ckpt["best_acc"]
    kept = "the model it inherited" if epoch < 0 else f"epoch {epoch}"
    print(f"stage {stage}: best val Acc@0.5 {acc:.4f} ({kept})")' "$OUTPUT_DIR" "$LORA_STAGES"
grep "^test Acc@0.5" "$OUTPUT_DIR/eval.txt"
if [ "$TASK" = res ]; then grep -E "^test (mask_miou|mask_oiou|box_mask_miou):" "$OUTPUT_DIR/eval.txt"; fi
