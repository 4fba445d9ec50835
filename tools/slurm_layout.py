#!/usr/bin/env python
"""Dry-run of a Slurm allocation: resolve and check the TP/PP/VP/DP layout before queueing; the logic
is aim_megatron/scaling/slurm_layout.py (installed as `aim-layout`).

    python tools/slurm_layout.py --preset aim-7B --nodes 8
    python tools/slurm_layout.py --preset aim-7B --nodes 512 --recommend
"""
import sys

from aim_megatron.scaling.slurm_layout import main

if __name__ == "__main__":
    sys.exit(main())
