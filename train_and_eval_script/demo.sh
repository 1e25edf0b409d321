#!/usr/bin/env bash
# The embedded demo: the whole HiVG recipe (stage 0, then Hi LoRA stages 1-3) of a tiny model on the
# synthetic set, on CPU, then evaluation. Everything goes under $OUTPUT_DIR (default outputs/demo).
#
#   bash train_and_eval_script/demo.sh
#
# The demo model (models/configs/demo.json) is a random CLIP whose vision position embedding starts
# as a 2-D sine-cosine table: with open_clip's random init the box regressor cannot read positions.
# It is kept small for 2 CPU cores: 3 frozen vision blocks, one bridge in the last block (backward
# stops there), a 4-layer fusion encoder without dropout, batch 64. Stage 0 sees EPOCHS0 epochs of the
# generated set (EPOCH_SAMPLES > 0: that many samples drawn afresh each epoch); at this scale the number
# of samples seen decides the accuracy (a large generated set beats more epochs over a small one). Each
# Hi LoRA stage trains one epoch drawn from the set at low learning rates (1e-4, 5e-5, 2.5e-5) so that it
# refines the previous stage instead of knocking it off its minimum: stage 1 LORA_SAMPLES, stages 2 and 3
# LATE_LORA_SAMPLES, since at this scale they add nothing over stage 1 (README, measured). The last lines
# give the best val Acc@0.5 after each stage and the test Acc@0.5, overall and for the expressions that
# colour/shape/size words resolve or that need location or relation words (README, "Quick start").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/demo}
DATA_DIR=${DATA_DIR:-$OUTPUT_DIR/data}
NUM_TRAIN=${NUM_TRAIN:-48000}
EPOCHS0=${EPOCHS0:-3}
EPOCH_SAMPLES=${EPOCH_SAMPLES:-0}
EPOCHS_LORA=${EPOCHS_LORA:-1}
LORA_SAMPLES=${LORA_SAMPLES:-6400}
LATE_LORA_SAMPLES=${LATE_LORA_SAMPLES:-1600}
BATCH=${BATCH:-64}
WORKERS=${WORKERS:-1}
start=$(date +%s)

if [ ! -f "$DATA_DIR/synthref/synthref_test.pth" ]; then
    "$PYTHON" -m datasets.synthetic --out "$DATA_DIR" --num_train "$NUM_TRAIN" --num_val 300 --num_test 500 --imsize 64
fi
"$PYTHON" -m datasets.synthetic --baseline "$DATA_DIR" --split test

COMMON=(--device cpu --num_workers "$WORKERS" --batch_size "$BATCH" --lr_scheduler cosine --overwrite)  # a rerun replaces the demo
"$PYTHON" train_hivg.py "${COMMON[@]}" --model demo --dataset synthref --data_root "$DATA_DIR" --split_root "$DATA_DIR" \
    --imsize 64 --max_query_len 16 --vl_enc_layers 4 --vl_nheads 4 --vl_dim_feedforward 256 --vl_dropout 0 \
    --normalize_before --enable_adaptive_weights --use_rtcc_constrain_loss --use_mask_loss \
    --epochs "$EPOCHS0" --epoch_samples "$EPOCH_SAMPLES" --lr 1e-3 --output_dir "$OUTPUT_DIR/stage0"
prev=$OUTPUT_DIR/stage0
for stage in 1 2 3; do
    lr=$(awk -v s="$stage" 'BEGIN { print 1e-4 / 2 ^ (s - 1) }')
    samples=$([ "$stage" = 1 ] && echo "$LORA_SAMPLES" || echo "$LATE_LORA_SAMPLES")
    "$PYTHON" train_hivg.py "${COMMON[@]}" --hi_lora_retrain "$prev/best_checkpoint.pth" \
        --epochs "$EPOCHS_LORA" --epoch_samples "$samples" --lr "$lr" --output_dir "$OUTPUT_DIR/stage$stage"
    prev=$OUTPUT_DIR/stage$stage
done
"$PYTHON" eval.py --device cpu --num_workers "$WORKERS" --eval_model "$prev/best_checkpoint.pth" --eval_set val test --visualize 6 \
    | tee "$OUTPUT_DIR/eval.txt"
# One picture of what the model sees: the first test image with its own expression.
read -r IMAGE TEXT < <("$PYTHON" -c "import torch; r = torch.load('$DATA_DIR/synthref/synthref_test.pth', weights_only=True)[0]; print(r[0], r[3])")
"$PYTHON" predict.py --device cpu --checkpoint "$prev/best_checkpoint.pth" --image "$DATA_DIR/synthref/images/$IMAGE" \
    --text "$TEXT" --heatmap --out "$OUTPUT_DIR/predict.png"
echo "demo finished in $(( $(date +%s) - start ))s"
for stage in 0 1 2 3; do
    "$PYTHON" -c 'import json, sys; print("stage %s: best val Acc@0.5 %.4f" % (sys.argv[1], max(json.loads(line)["val_acc"] for line in open(sys.argv[2]))))' \
        "$stage" "$OUTPUT_DIR/stage$stage/log.txt"
done
grep "^test Acc@0.5" "$OUTPUT_DIR/eval.txt"
