#!/usr/bin/env bash
# GPU check of the text pipeline: which strategy/precision/XLA `auto` picks, and
# training examples/s of the demo SST-2 fine-tune (MiniLM-L6) on the GPU.
#
#   bash benchmarks/gpu_text_pipeline.sh                # ~3-6 min on one modern GPU
#   RUNS="mixed_float16:auto" bash benchmarks/gpu_text_pipeline.sh
#
# Each run is `python -m pipelines.text_classify --flagfile=pipelines/configs/demo_sst2.flags
# --distribution=auto --precision=P --jit_compile=J` for EPOCHS epochs of the 6,920
# SST-2 training sentences (216 steps of 32 per epoch: ~430 steps by default),
# into a throw-away model_dir. The default runs separate the two gains: mixed_float16
# with XLA as `auto` decides (on for one GPU), mixed_float16 without XLA, float32.
# The whole script stays under BUDGET_S (default 450 s, inside an 8-minute device
# slot): each run may use what is left minus RESERVE_S (default 100 s) for each run
# after it, so the first (the one that matters) gets the most, and a run with under
# 60 s left is skipped.
#
# Environment knobs: PYTHON, RUNS (space-separated precision:jit_compile pairs),
# EPOCHS, BATCH_SIZE, BUDGET_S, RESERVE_S, SST2_DIR (folder with train.tsv and dev.tsv),
# MAX_TRAIN_EXAMPLES (0: all), and ALLOW_CPU=1 to dry-run the plumbing on a
# machine without a GPU (with e.g. MAX_TRAIN_EXAMPLES=64 EPOCHS=1).
#
# Reported examples/s is the pipeline's own figure: epochs x training examples /
# wall time of `fit`, so it includes tracing/XLA compilation and the per-epoch
# validation pass (872 sentences); with ~430 steps those are a small share.
set -uo pipefail
cd "$(dirname "$0")/.."

START=$SECONDS
BUDGET_S=${BUDGET_S:-450}
RESERVE_S=${RESERVE_S:-100}
EPOCHS=${EPOCHS:-2}
BATCH_SIZE=${BATCH_SIZE:-32}
RUNS=${RUNS:-"mixed_float16:auto mixed_float16:false float32:false"}
MAX_TRAIN_EXAMPLES=${MAX_TRAIN_EXAMPLES:-0}
ALLOW_CPU=${ALLOW_CPU:-0}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# The flagfile reads ../shared/data/sst2 and falls back to TFDS (internet); find the
# data first so a machine without either fails in seconds, not at the timeout.
if [[ -z "${SST2_DIR:-}" ]]; then
  for candidate in ../shared/data/sst2 shared/data/sst2; do
    if [[ -f "$candidate/train.tsv" ]]; then SST2_DIR=$candidate; break; fi
  done
fi
if [[ -z "${SST2_DIR:-}" || ! -f "$SST2_DIR/train.tsv" || ! -f "$SST2_DIR/dev.tsv" ]]; then
  echo "error: SST-2 data not found (looked in ../shared/data/sst2 and shared/data/sst2); set SST2_DIR." >&2
  exit 2
fi

echo "== GPU"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi not available"

# What `auto` resolves to here, from the same functions the pipeline calls, and a
# hard stop if TensorFlow sees no GPU (a CPU run of 430 steps would only time out).
echo "== What auto picks"
if ! ALLOW_CPU=$ALLOW_CPU timeout 120 "$PYTHON" - <<'EOF'
import os
import sys

import tensorflow as tf

from tfhub_finetune import distribute

gpus = tf.config.list_physical_devices("GPU")
print(f"TensorFlow {tf.__version__}, visible GPUs: {len(gpus)}")
for gpu in gpus:
    details = tf.config.experimental.get_device_details(gpu)
    print(f"  {gpu.name}: {details.get('device_name')} compute capability {details.get('compute_capability')}")
if not gpus and os.environ.get("ALLOW_CPU") != "1":
    print("error: TensorFlow sees no GPU (CUDA build of TensorFlow installed? drivers?)", file=sys.stderr)
    sys.exit(3)
precision = distribute.resolve_precision("auto")
strategy = distribute.get_distribution_strategy("auto")
print(f"distribution=auto -> {distribute.describe_strategy(strategy)}")
print(f"precision=auto    -> {precision}")
print(f"jit_compile=auto  -> {distribute.resolve_jit_compile('auto', strategy)}")
EOF
then
  echo "error: pre-check failed; not starting the training runs." >&2
  exit 3
fi

RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_text_pipeline.XXXXXX")
trap 'rm -rf "$RUN_DIR"' EXIT
SUMMARY=()
read -r -a RUN_LIST <<< "$RUNS"
for index in "${!RUN_LIST[@]}"; do
  run=${RUN_LIST[$index]}
  precision=${run%%:*}
  jit=${run##*:}
  left=$(( BUDGET_S - (SECONDS - START) ))
  later_runs=$(( ${#RUN_LIST[@]} - index - 1 ))
  limit=$(( left - RESERVE_S * later_runs ))
  if (( limit < 60 )); then
    SUMMARY+=("$(printf '%-15s %-6s skipped: only %ss of the budget left' "$precision" "$jit" "$left")")
    continue
  fi
  log="$RUN_DIR/$precision-$jit.log"
  echo "== Run: precision=$precision jit_compile=$jit (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$PYTHON" -m pipelines.text_classify \
    --flagfile=pipelines/configs/demo_sst2.flags \
    --train_data="$SST2_DIR/train.tsv" --eval_data="$SST2_DIR/dev.tsv" \
    --model_dir="$RUN_DIR/model-$precision-$jit" \
    --distribution=auto --precision="$precision" --jit_compile="$jit" \
    --epochs="$EPOCHS" --batch_size="$BATCH_SIZE" --max_train_examples="$MAX_TRAIN_EXAMPLES" \
    --verbose=2 > "$log" 2>&1
  status=$?
  strategy_line=$(grep -m1 '^Strategy:' "$log" || true)
  speed=$(grep -m1 -o '([0-9.]* examples/s)' "$log" | tr -d '()' || true)
  accuracy=$(grep -m1 -o 'accuracy=[0-9.]*' "$log" || true)
  echo "${strategy_line:-Strategy: (not printed)}"
  echo "exit $status, ${speed:-no examples/s printed}, ${accuracy:-no eval}"
  if (( status != 0 )); then
    echo "--- last lines of the log:"; tail -n 15 "$log"
  fi
  SUMMARY+=("$(printf '%-15s %-6s %-22s %-16s exit %s | %s' "$precision" "$jit" "${speed:--}" "${accuracy:--}" "$status" "${strategy_line#Strategy: }")")
done

echo
echo "== Summary (batch $BATCH_SIZE, $EPOCHS epochs of SST-2, $(( SECONDS - START ))s total)"
printf '%-15s %-6s %-22s %-16s %s\n' precision jit examples/s eval status
for line in "${SUMMARY[@]}"; do echo "$line"; done
