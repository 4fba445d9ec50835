# aim-megatron: the two entry points of the README, plus benchmarks.
PYTHON ?= python3

.PHONY: setup test demo bench

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

# The whole test suite on CPU (gloo): ~15 minutes on 2 cores.
test: setup
	$(PYTHON) -m pytest -q

# Pre-train a small AIM on Fashion-MNIST on CPU, then probe it (see examples/demo.sh).
demo: setup
	PYTHON=$(PYTHON) bash examples/demo.sh

bench: setup
	$(PYTHON) benchmarks/trunk_throughput.py
	$(PYTHON) benchmarks/data_throughput.py
