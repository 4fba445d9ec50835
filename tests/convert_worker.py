"""In-memory conversion paths under torchrun, for comparing the streaming ones against them.

    torchrun --nproc_per_node N tests/convert_worker.py import --src F --dst D key=value ...
        the in-memory import (a model in the target layout, optimizer and all)
    torchrun --nproc_per_node N tests/convert_worker.py dump --src STEP --out F.pt key=value ...
        load STEP in the layout the overrides give and save the full weights (rank 0)
"""
import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from aim_megatron.checkpoint import checkpointer as checkpoint
from aim_megatron.checkpoint import convert
from aim_megatron.checkpoint.official import RELEASED_LAYERNORM_EPS
from aim_megatron.config import load_config
from aim_megatron.distributed import parallel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["import", "dump"])
    ap.add_argument("--src", type=Path, required=True)
    ap.add_argument("--dst", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    if args.command == "import":
        cfg = load_config(None, [RELEASED_LAYERNORM_EPS, *args.overrides, f"train.output_dir={args.dst}"])
        convert.import_official(args.src, args.dst, cfg)
    else:
        cfg = checkpoint.config_from_checkpoint(args.src, args.overrides)
        parallel.initialize(cfg)
        model = parallel.build_model(cfg, wrap_ddp=False)
        checkpoint.load(args.src, cfg, model)
        full = parallel.gather_full_state_dict(model)
        if dist.get_rank() == 0:
            torch.save(full, args.out)
    parallel.shutdown()


if __name__ == "__main__":
    main()
