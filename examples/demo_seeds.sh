#!/usr/bin/env bash
# The demo (examples/demo.sh) once per pre-training seed, then the mean and spread of its figures.
# Run through `make demo-seeds` (3 seeds: ~36 minutes on a quiet 2-core machine in bf16).
# SEEDS="1234 7 42" by default; arguments are extra pre-training overrides for every seed, e.g.
# `bash examples/demo_seeds.sh train.params_dtype=fp32` (what a CPU without fast bf16 runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
SEEDS="${SEEDS:-1234 7 42}"
ROOT="${OUT:-runs/demo-seeds}"
summaries=()
for seed in $SEEDS; do
  echo "==== seed $seed"
  OUT="$ROOT/seed$seed" bash examples/demo.sh "train.seed=$seed" "$@"
  summaries+=("$ROOT/seed$seed/probe/summary.json")
done
"$PYTHON" -m aim_megatron.evaluation.seed_summary "${summaries[@]}" --out "$ROOT/summary.json"
