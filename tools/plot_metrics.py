#!/usr/bin/env python
"""Plot a run's training and validation loss (and lr) from its metrics.jsonl to a PNG.

    python tools/plot_metrics.py runs/demo [--out runs/demo/loss_curve.png]
"""
import sys

from aim_megatron.training.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main())
