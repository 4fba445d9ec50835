#!/usr/bin/env python3
"""The AIM paper's main findings, reproduced in direction at CPU scale on Fashion-MNIST; the logic is
aim_megatron/evaluation/findings.py.

    python tools/findings.py run    [--only base,causal,...] [--seeds 3] [--steps 400] [--jobs 1]
    python tools/findings.py report                      # tables + PNGs -> docs/findings.md
    python tools/findings.py all                         # run, then report (make findings)
"""
import sys

from aim_megatron.evaluation.findings import main

if __name__ == "__main__":
    sys.exit(main())
