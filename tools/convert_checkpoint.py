#!/usr/bin/env python
"""Convert between the official AIM v1 torch format (or ml-l3m checkpoints) and aim-megatron
checkpoints; the logic is aim_megatron/checkpoint/convert.py (installed as `aim-convert`).

    python tools/convert_checkpoint.py import --src aim_600m.pth \\
        --dst runs/aim600m model.preset=aim-600M parallel.tp=2 parallel.pp=2 \\
        [--config base.yaml] [--probe-out runs/aim600m/probe/official.safetensors --probe-layers best]
    python tools/convert_checkpoint.py export --src runs/x/checkpoints/step_00001000 \\
        --out aim.pth [--probe runs/x/probe/attentive-last/probe.safetensors]
    python tools/convert_checkpoint.py import --format l3m \\
        --src l3m_out/checkpoint_99999.pth --dst runs/aim600m model.preset=aim-600M parallel.tp=2
    python tools/convert_checkpoint.py export --format l3m --src runs/aim600m/checkpoints/step_00001000 \\
        --out aim600m_l3m.pth
"""
import sys

from aim_megatron.checkpoint.convert import main

if __name__ == "__main__":
    sys.exit(main())
