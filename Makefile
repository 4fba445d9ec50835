# aim-megatron: the two entry points of the README, plus benchmarks.
PYTHON ?= python3

.PHONY: setup test demo demo-seeds findings bench gpu-check

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

# The whole test suite on CPU (gloo), incl. a real local Slurm cluster: ~25 minutes on an idle 2-core machine.
test: setup
	$(PYTHON) -m pytest -q --durations=15

# Pre-train a small AIM on Fashion-MNIST on CPU, then probe it (see examples/demo.sh).
demo: setup
	PYTHON=$(PYTHON) bash examples/demo.sh

# The demo once per pre-training seed (1234, 7, 42), then mean +- sd of its figures (~36 minutes).
# Extra overrides for every seed: make demo-seeds ARGS=train.params_dtype=fp32
demo-seeds: setup
	PYTHON=$(PYTHON) bash examples/demo_seeds.sh $(ARGS)

# The AIM paper's findings at CPU scale (tools/findings.py, docs/findings.md): 6 variants x 3 seeds x
# 400 steps of the demo model with 7x7 patches, 24 probes; about 1 hour on a quiet 2-core machine
# (measured 2026-12-03). Piece by piece: tools/findings.py run --only base,raw; then report.
findings: setup
	PYTHON=$(PYTHON) bash -c 'for s in train test; do [ -f data/fashion-mnist/$$s/manifest.json ] || \
		$(PYTHON) tools/make_shards.py --fashion-mnist $$s --out data/fashion-mnist/$$s; done'
	$(PYTHON) tools/findings.py all

bench: setup
	$(PYTHON) benchmarks/trunk_throughput.py
	$(PYTHON) benchmarks/data_throughput.py

# On a GPU machine (e.g. the NGC container of the Dockerfile; no setup: it carries CUDA torch and
# TE): one script, <= 8 minutes on one H100/H200, everything in results/gpu_check.json: the GPU
# tests, the fused kernels' self-check, the MFU table, FP8 vs bf16 loss and the micro-batch x
# recompute sweep (docs/gpu.md). On CPU it is a ~1 minute dry run that says what it skipped.
gpu-check:
	$(PYTHON) scripts/gpu_check.py
