#!/usr/bin/env bash
# The README's main job, on a CPU: pre-train a small AIM on Fashion-MNIST, plot its loss curves,
# then compare an attentive probe on its frozen trunk with one on a randomly initialised trunk.
# Run through `make demo` (which installs everything first). About 15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-runs/demo}"
DATA="${DATA:-data/fashion-mnist}"
PROBE_ARGS=(--data "$DATA" --train-samples 10000 --test-samples 2000)   # the shards of step 1

echo "== 1/4 WebDataset shards of Fashion-MNIST (60k train, 10k test) in $DATA"
for split in train test; do
  if [ ! -f "$DATA/$split/manifest.json" ]; then
    "$PYTHON" tools/make_shards.py --fashion-mnist "$split" --out "$DATA/$split"
  fi
done

echo "== 2/4 pre-training (examples/configs/aim_fmnist_demo.yaml) into $OUT"
"$PYTHON" -m aim_megatron.train --config examples/configs/aim_fmnist_demo.yaml \
  "train.output_dir=$OUT" "data.train_sources=[$DATA/train]" "data.val_sources=[$DATA/test]"

echo "== 3/4 loss curves"
"$PYTHON" tools/plot_metrics.py "$OUT"

echo "== 4/4 attentive probes: pre-trained trunk vs randomly initialised trunk"
"$PYTHON" -m aim_megatron.probe --checkpoint "$OUT" "${PROBE_ARGS[@]}" --out "$OUT/probe/trained"
"$PYTHON" -m aim_megatron.probe --checkpoint "$OUT" --random-init "${PROBE_ARGS[@]}" --out "$OUT/probe/random"

"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
val = [json.loads(l)["val_loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
trained = json.loads((out / "probe/trained/metrics.json").read_text())
random_ = json.loads((out / "probe/random/metrics.json").read_text())
print(f"\nvalidation loss: {val[0]:.4f} (first evaluation) -> {val[-1]:.4f} (end)   curve: {out}/loss_curve.png")
print(f"attentive probe top-1: pre-trained trunk {trained['top1']:.4f}  vs  random trunk {random_['top1']:.4f}")
print(f"confusion matrix: {out}/probe/trained/confusion.png")
PY
