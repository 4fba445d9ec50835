#!/usr/bin/env bash
# The README's main job, on a CPU: pre-train a small AIM on Fashion-MNIST, plot its loss curves,
# then compare an attentive probe on its frozen trunk with one on a randomly initialised trunk and
# with logistic regression and k-NN on the raw pixels of the same images.
# Run through `make demo` (which installs everything first). About 12 minutes on a quiet 2-core machine
# with fast bf16 (16 where `auto` gives fp32); `make demo-seeds` runs it for 3 seeds.
# Arguments are extra pre-training overrides, e.g. `bash examples/demo.sh train.seed=7`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-runs/demo}"
DATA="${DATA:-data/fashion-mnist}"
PROBE_TRAIN="${PROBE_TRAIN:-10000}"   # seeded subset of the 60k training images for probes and baselines
PROBE_ARGS=(--data "$DATA" --train-samples "$PROBE_TRAIN")   # the shards of step 1; all 10k test images
# 16 probe heads instead of the trunk's 4: each head pools its own attention map, +3 points here (docs/probe.md)
PROBE_SET=(probe.num_heads=16)

echo "== 1/5 WebDataset shards of Fashion-MNIST (60k train, 10k test) in $DATA"
for split in train test; do
  if [ ! -f "$DATA/$split/manifest.json" ]; then
    "$PYTHON" tools/make_shards.py --fashion-mnist "$split" --out "$DATA/$split"
  fi
done

# The config says train.params_dtype=auto: bf16 on a CPU with AVX512-BF16/AMX (2x fp32's speed), else fp32.
echo "== 2/5 pre-training (examples/configs/aim_fmnist_demo.yaml) into $OUT"
"$PYTHON" -m aim_megatron.train --config examples/configs/aim_fmnist_demo.yaml \
  "train.output_dir=$OUT" "data.train_sources=[$DATA/train]" "data.val_sources=[$DATA/test]" "$@"

echo "== 3/5 loss curves"
"$PYTHON" tools/plot_metrics.py "$OUT"

echo "== 4/5 pixel baselines on the same images: logistic regression and k-NN"
"$PYTHON" -m aim_megatron.evaluation.baselines "${PROBE_ARGS[@]}" --out "$OUT/probe/pixels"

echo "== 5/5 attentive probes: pre-trained trunk vs randomly initialised trunk"
"$PYTHON" -m aim_megatron.probe --checkpoint "$OUT" "${PROBE_ARGS[@]}" --out "$OUT/probe/trained" "${PROBE_SET[@]}"
"$PYTHON" -m aim_megatron.probe --checkpoint "$OUT" --random-init "${PROBE_ARGS[@]}" --out "$OUT/probe/random" \
  "${PROBE_SET[@]}"

"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
val = [json.loads(l)["val_loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
read = lambda name: json.loads((out / "probe" / name / "metrics.json").read_text())
trained, random_, pixels = read("trained"), read("random"), read("pixels")
print(f"\nvalidation loss: {val[0]:.4f} (first evaluation) -> {val[-1]:.4f} (end)   curve: {out}/loss_curve.png")
print(f"top-1 on {trained['num_test']} test images, {trained['num_train']} training images:")
rows = [("attentive probe, pre-trained trunk", trained["top1"]),
        ("attentive probe, random-init trunk", random_["top1"]),
        (f"logistic regression on pixels (l2 {pixels['logreg']['l2']:g})", pixels["logreg"]["top1"]),
        (f"k-NN on pixels (k={pixels['knn']['k']})", pixels["knn"]["top1"])]
for name, top1 in rows:
    print(f"  {name:<44} {top1:.4f}")
best = max(pixels["logreg"]["top1"], pixels["knn"]["top1"])
verdict = "beat" if trained["top1"] > best else "do NOT beat"
print(f"pre-trained features {verdict} the best pixel baseline: {100 * (trained['top1'] - best):+.1f} points")
print(f"confusion matrix: {out}/probe/trained/confusion.png")
(out / "probe" / "summary.json").write_text(json.dumps(
    {"val_loss_first": val[0], "val_loss_last": val[-1], **{name: top1 for name, top1 in rows},
     "margin_over_best_pixel_baseline": trained["top1"] - best}, indent=2))
PY
