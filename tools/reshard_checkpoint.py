#!/usr/bin/env python
"""Convert an aim-megatron checkpoint to another parallel layout, or export its weights.

Reshard (model + optimizer, offline; run with the *target* number of processes):

    torchrun --nproc_per_node 4 tools/reshard_checkpoint.py reshard \\
        --src runs/a/checkpoints/step_00001000 --dst runs/b parallel.tp=2 parallel.pp=2

writes runs/b/checkpoints/step_00001000 (+ latest), from which `aim-pretrain` with
train.output_dir=runs/b and the same layout resumes. Any TP/PP/VP/DP layout can be the source
or the target: the checkpoint stores tensors by global key and the distributed optimizer in
megatron-core's fully reshardable format. The optimizer type (distributed or not) must match.

Export a consolidated single-file state dict (one process, any source layout):

    python tools/reshard_checkpoint.py export --src .../step_00001000 --out trunk.safetensors \\
        [--names official|megatron] [--with-head]

`--names official` uses the released AIM v1 key names and qkv row order.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aim_megatron import checkpoint, cli, parallel  # noqa: E402
from aim_megatron.config import ConfigError  # noqa: E402
from aim_megatron.reference import megatron_to_reference  # noqa: E402
from aim_megatron.train import build_scheduler  # noqa: E402

log = logging.getLogger("reshard")


def reshard(src: Path, dst: Path, overrides: list[str]) -> Path:
    cfg = checkpoint.config_from_checkpoint(src, overrides + [f"train.output_dir={dst}"])
    parallel.initialize(cfg)
    model = parallel.build_model(cfg)
    optimizer = parallel.build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    restored = checkpoint.load(src, cfg, model, optimizer, scheduler)
    step = restored["trainer"]["step"]
    # Data-loader positions belong to the old data-parallel layout: the resumed run repositions
    # its loader from the step count instead.
    out = checkpoint.save(dst / "checkpoints", step, cfg, model, optimizer, scheduler,
                          restored["trainer"], data_state=None)
    if dist.get_rank() == 0:
        log.info("resharded %s -> %s (tp=%d pp=%d vp=%s, %d processes)", src, out,
                 cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vp, dist.get_world_size())
    return out


def export(src: Path, out: Path, names: str, with_head: bool) -> dict[str, torch.Tensor]:
    cfg = checkpoint.config_from_checkpoint(
        src, ["parallel.tp=1", "parallel.pp=1", "parallel.vp=null",
              "parallel.sequence_parallel=false", "parallel.trunk_layers_in_last_stage=null",
              "parallel.use_distributed_optimizer=false"])
    parallel.initialize(cfg)
    model = parallel.build_model(cfg, wrap_ddp=False)
    checkpoint.load(src, cfg, model)
    full = parallel.gather_full_state_dict(model)
    if names == "official":
        full = megatron_to_reference(full, cfg.model)
    if not with_head:
        full = {k: v for k, v in full.items() if not k.startswith("head.")}
    full = {k: v.contiguous() for k, v in full.items()}
    checkpoint.write_state_dict(full, out, metadata={"model": str(cfg.model.preset), "names": names})
    return full


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    ap = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reshard", help="rewrite a checkpoint for another parallel layout")
    r.add_argument("--src", type=Path, required=True, help="a step_* checkpoint directory")
    r.add_argument("--dst", type=Path, required=True, help="new output dir (checkpoints/ inside)")
    r.add_argument("overrides", nargs="*", help="target layout, e.g. parallel.tp=2 parallel.pp=2")
    e = sub.add_parser("export", help="write a consolidated single-file state dict")
    e.add_argument("--src", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True, help=".safetensors or .pt")
    e.add_argument("--names", choices=["official", "megatron"], default="official")
    e.add_argument("--with-head", action="store_true", help="include the pre-training head")
    args = ap.parse_args(argv)

    def check_args() -> None:
        """Paths checked before any process group or model exists; nothing is overwritten."""
        if not (args.src / checkpoint.META_FILE).is_file():
            raise checkpoint.CheckpointError(
                f"--src {args.src}: not a checkpoint directory; pass RUN/checkpoints/step_*")
        if args.command == "reshard" and (args.dst / "checkpoints" / checkpoint.LATEST_FILE).exists():
            raise ConfigError(f"--dst {args.dst} already holds checkpoints; reshard into a new --dst")
        if args.command == "export" and (args.out.suffix not in (".safetensors", ".pt", ".pth")
                                         or args.out.is_dir()):
            raise ConfigError(f"--out {args.out}: name a .safetensors, .pt or .pth file")

    def body() -> None:
        check_args()
        if args.command == "reshard":
            bad = [o for o in args.overrides if not o.startswith("parallel.")]
            if bad:
                raise ConfigError(f"only parallel.* settings may change when resharding, got {bad}")
            reshard(args.src, args.dst, args.overrides)
        else:
            export(args.src, args.out, args.names, args.with_head)

    return parallel.run_cli("reshard_checkpoint", body, (ConfigError, checkpoint.CheckpointError))

if __name__ == "__main__":
    sys.exit(main())
