#!/usr/bin/env python
"""Per-GPU memory of AIM training for a preset/config and a Megatron layout; the logic is
aim_megatron/scaling/estimate_memory.py (installed as `aim-estimate-memory`).

    python tools/estimate_memory.py --preset aim-7B --gpus 64
    python tools/estimate_memory.py --table [--gpus 8 64 512 4096]    # recommended layouts
"""
import sys

from aim_megatron.scaling.estimate_memory import main

if __name__ == "__main__":
    sys.exit(main())
