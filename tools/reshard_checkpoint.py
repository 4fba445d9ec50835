#!/usr/bin/env python
"""Convert an aim-megatron checkpoint to another parallel layout, or export its weights; the logic is
aim_megatron/checkpoint/reshard.py (installed as `aim-reshard`).

    python tools/reshard_checkpoint.py reshard \\
        --src runs/a/checkpoints/step_00001000 --dst runs/b parallel.tp=2 parallel.pp=2
    python tools/reshard_checkpoint.py export --src .../step_00001000 --out trunk.safetensors \\
        [--names official|megatron] [--with-head]
"""
import sys

from aim_megatron.checkpoint.reshard import main

if __name__ == "__main__":
    sys.exit(main())
