#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md, "GPU check"): on one CUDA card, within --budget seconds (default 460),
# the CUDA tests, a tiny two-stage training run end to end (train, resume, next stage, eval) and the ViT-B/16
# benchmarks (batch 64; fp32+TF32, bf16, bf16+compile; fast and reference paths), as one markdown table in
# OUT/gpu_check.md, also printed. --dry-run runs the same steps on the CPU: tiny model, batch 2, one step.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--budget SECONDS]
#
# Every step has a time limit; a step past it, or one the budget leaves no time for, gets its own status in
# the table. Exit status 0 when every row is ok, 1 otherwise; each step's output is in OUT/logs/.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0 OUT=outputs/gpu_check BUDGET=
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --out) OUT=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--budget SECONDS]" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if [ "$DRY" = 1 ]; then
    DEVICE=cpu BUDGET=${BUDGET:-900} WORKERS=0 EPOCH_SAMPLES=8 NAME=tiny
    BENCH=(--model tiny --imsize 64 --batch_size 2 --warmup 1 --steps 1 --compile_backend eager)
else
    DEVICE=cuda BUDGET=${BUDGET:-460} WORKERS=2 EPOCH_SAMPLES=0 NAME=B/16
    BENCH=(--model ViT-B/16 --imsize 224 --batch_size 64 --warmup 3 --steps 10)
    "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" ||
        { echo "no CUDA device here; --dry-run runs the same steps on the CPU" >&2; exit 2; }
fi
mkdir -p "$OUT/logs"
ROWS=$OUT/rows.tsv
: > "$ROWS"
START=$SECONDS

# step NAME LIMIT COMMAND...: COMMAND under LIMIT seconds (or what the budget has left), output in OUT/logs;
# appends the row: name, status, seconds, log.
step() {
    local name=$1 limit=$2 left=$((BUDGET - (SECONDS - START))) t0=$SECONDS rc status
    local log=$OUT/logs/$(wc -l < "$ROWS").log
    shift 2
    if [ "$left" -lt 20 ]; then
        printf '%s\tskipped (budget)\t0\t%s\n' "$name" "$log" >> "$ROWS"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    timeout -k 10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timeout (${limit} s)" ;;
        *) status="FAIL (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" $((SECONDS - t0)) "$log" >> "$ROWS"
    echo "$name: $status, $((SECONDS - t0)) s" >&2
}

step "CUDA tests (pytest -m cuda)" 240 "$PY" -m pytest -q -m cuda tests/

# A tiny two-stage run end to end, as tests/test_train.py's flags() (the cheap, essential part: before the benchmarks).
DATA=$OUT/synthref RUN=$OUT/tiny
rm -rf "$DATA" "$RUN"
TINY=(--model tiny --dataset synthref --data_root "$DATA" --split_root "$DATA" --imsize 64 --max_query_len 16
      --batch_size 8 --lr 1e-3 --lr_scheduler cosine --use_rtcc_constrain_loss --use_mask_loss
      --epoch_samples "$EPOCH_SAMPLES")
HERE=(--device "$DEVICE" --num_workers "$WORKERS")
step "run: synthetic data" 60 \
    "$PY" -m datasets.synthetic --out "$DATA" --num_train 48 --num_val 13 --num_test 11 --imsize 64
step "run: stage 0, epoch 1 of 2" 120 "$PY" train_hivg.py "${TINY[@]}" "${HERE[@]}" --epochs 2 --run_epochs 1 \
    --output_dir "$RUN/s0"
step "run: stage 0, --resume, epoch 2" 120 "$PY" train_hivg.py --resume "$RUN/s0/checkpoint.pth" "${HERE[@]}"
step "run: stage 1, --hi_lora_retrain, bf16" 120 "$PY" train_hivg.py --hi_lora_retrain "$RUN/s0/best_checkpoint.pth" \
    "${HERE[@]}" --epochs 1 --amp bf16 --output_dir "$RUN/s1"
step "run: eval.py, val and test" 120 "$PY" eval.py --eval_model "$RUN/s1/best_checkpoint.pth" --eval_set val test \
    "${HERE[@]}"

# The benchmarks, one path per process (peak memory its own); the compiled ones last, as they cost the most.
RUNS=("eval 0" "train 0" "train 3")
for run in "${RUNS[@]}"; do
    read -r mode stage <<< "$run"
    for variant in "fp32+TF32:fast" "fp32+TF32:reference" "bf16:fast"; do
        amp=none
        [ "${variant%%:*}" = bf16 ] && amp=bf16
        step "bench $NAME $mode stage $stage, ${variant%%:*}, ${variant#*:}" 120 "$PY" benchmarks/bench_model.py \
            "${BENCH[@]}" --device "$DEVICE" --mode "$mode" --stage "$stage" --amp "$amp" --path "${variant#*:}"
    done
done
for run in "${RUNS[@]}"; do
    read -r mode stage <<< "$run"
    step "bench $NAME $mode stage $stage, bf16+compile, fast" 300 "$PY" benchmarks/bench_model.py "${BENCH[@]}" \
        --device "$DEVICE" --mode "$mode" --stage "$stage" --amp bf16 --compile --path fast
done

# One table: every step's status and time; for the benchmarks their figures, and the share of the card's
# bf16 matmul peak (the best bf16 matmul rate the bf16 runs measured).
"$PY" - "$ROWS" "$OUT/gpu_check.md" "$DRY" "$((SECONDS - START))" "$BUDGET" <<'EOF'
import datetime, json, sys
from pathlib import Path

import torch

rows_path, out, dry, total, budget = sys.argv[1:]
rows = [line.rstrip("\n").split("\t") for line in open(rows_path)]


def result(log):
    lines = Path(log).read_text(errors="replace").splitlines() if Path(log).is_file() else []
    try:
        return json.loads(lines[-1]), lines
    except (IndexError, ValueError):
        return None, lines


def summary(lines):
    """The line that says how a step went: accuracies (eval.py), the run's end, pytest's count, an error."""
    accs = [s for s in lines if " Acc@0.5: " in s]
    hits = [s for s in lines if s.startswith("done: ") or " passed" in s or " skipped" in s or "rror" in s]
    text = "; ".join(accs) if accs else (hits or lines or [""])[-1]
    return text.strip(" =")[:120].replace("|", "/")


parsed = [(row, *result(row[3])) for row in rows]
bf16 = [r["matmul_gflops"] for row, r, _ in parsed if r and "bf16" in row[0]]
peak = max(bf16) if bf16 else float("nan")
device = "CPU, dry run" if dry == "1" else torch.cuda.get_device_name(0)
table = [f"# GPU check: {device}", "",
         f"torch {torch.__version__}, {datetime.date.today()}, {total} s of a {budget} s budget; bf16 matmul peak "
         f"measured {peak / 1e3:.1f} TFLOP/s.", "",
         "| step | status | s | samples/s | peak memory (MB) | TFLOP/s | share of bf16 peak | notes |",
         "|---|---|---|---|---|---|---|---|"]
for (name, status, secs, _), r, lines in parsed:
    if r:
        rate = r["flops_per_sample"] * r["samples_per_s"] / 1e9
        table.append(f"| {name} | {status} | {secs} | {r['samples_per_s']:.1f} | {r['peak_mem_mb']:.0f} | "
                     f"{rate / 1e3:.2f} | {rate / peak:.2f} | {r['step_s'] * 1e3:.0f} ms/step, warm-up "
                     f"{r['warmup_s']:.1f} s, {r['share_of_peak']:.2f} of its own dtype's matmul peak |")
    else:
        table.append(f"| {name} | {status} | {secs} | | | | | {summary(lines)} |")
Path(out).write_text("\n".join(table) + "\n")
print("\n".join(table))
EOF
echo "table: $OUT/gpu_check.md"
! cut -f2 "$ROWS" | grep -qv '^ok$'
