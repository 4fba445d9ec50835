#!/usr/bin/env python
"""Scaling-law sweeps: plan, launch, collect, fit, predict; the logic is aim_megatron/scaling/cli.py
(installed as `aim-sweep`).

    python tools/scaling_sweep.py plan examples/sweeps/tiny_cpu.yaml --out runs/sweep-tiny
    python tools/scaling_sweep.py launch runs/sweep-tiny --local [--jobs 2]
    python tools/scaling_sweep.py fit runs/sweep-tiny
"""
import sys

from aim_megatron.scaling.cli import main

if __name__ == "__main__":
    sys.exit(main())
