"""Convert an aim-megatron checkpoint to another parallel layout, or export its weights.

Reshard (model + optimizer, offline, one process; torchrun works too):

    python tools/reshard_checkpoint.py reshard \\
        --src runs/a/checkpoints/step_00001000 --dst runs/b parallel.tp=2 parallel.pp=2

writes runs/b/checkpoints/step_00001000 (+ latest), from which `aim-pretrain` with
train.output_dir=runs/b and the new layout resumes. The checkpoint stores every tensor by global
key and the distributed optimizer in megatron-core's fully reshardable format, so its files
serve any TP/PP/VP/DP layout as they are: the new directory hard-links them (copies across file
systems) and records the new parallel settings in aim_meta.json; the load in the new layout
reshards, and RNG and data-loader states restart from the sample position. Nothing is read into
memory. The optimizer type (parallel.use_distributed_optimizer) must stay: its state is stored
under other keys. A distributed optimizer saved with train.optimizer_checkpoint_format=dp_reshardable
serves only its own TP/PP/VP (a DP change needs no reshard): such a reshard is refused.

Export a consolidated single-file state dict (one process, any source layout, tensor by tensor):

    python tools/reshard_checkpoint.py export --src .../step_00001000 --out trunk.safetensors \\
        [--names official|megatron] [--with-head]

`--names official` uses the released AIM v1 key names and qkv row order.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

from aim_megatron import cli
from aim_megatron.checkpoint import checkpointer as checkpoint
from aim_megatron.checkpoint import streaming
from aim_megatron.config import ConfigError, validate
from aim_megatron.distributed import parallel

log = logging.getLogger("reshard")


def reshard(src: Path, dst: Path, overrides: list[str]) -> Path:
    """Link the checkpoint's files into dst and record the new layout's config."""
    meta = checkpoint.read_meta(src)
    cfg = checkpoint.config_from_checkpoint(src, overrides + [f"train.output_dir={dst}"])
    validate(cfg, int(os.environ.get("WORLD_SIZE", cfg.parallel.tp * cfg.parallel.pp)))
    saved = meta["config"]["parallel"]["use_distributed_optimizer"]
    if cfg.parallel.use_distributed_optimizer != saved and not meta.get("weights_only"):
        raise ConfigError(f"parallel.use_distributed_optimizer={saved} in {src}: the optimizer state of "
                          f"the other optimizer type is stored under other keys; keep {saved}")
    changed = checkpoint.optimizer_layout_change(meta, cfg.parallel)
    if changed:
        raise ConfigError(f"{src} holds the distributed optimizer's state in the dp_reshardable format "
                          f"({changed}): it serves only the TP/PP/VP it was written in. Resume once with "
                          f"train.optimizer_checkpoint_format=fully_reshardable and reshard that checkpoint")
    root = dst / "checkpoints"
    final = root / src.name
    if final.exists():
        raise ConfigError(f"--dst {dst} already holds {final.name}; reshard into a new --dst")
    tmp = root / f".tmp_{src.name}"
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in src.iterdir():
        if f.name != checkpoint.META_FILE and f.is_file():
            try:
                os.link(f, tmp / f.name)  # checkpoints are never modified in place: sharing is safe
            except OSError:
                shutil.copy2(f, tmp / f.name)
    # "layout" stays the source's: the RNG and data-loader states in common.pt belong to it.
    meta["config"] = cfg.to_dict()
    checkpoint._write_atomic(tmp / checkpoint.META_FILE, json.dumps(meta, indent=2))
    os.replace(tmp, final)
    checkpoint._write_atomic(root / checkpoint.LATEST_FILE, final.name)
    log.info("resharded %s -> %s (tp=%d pp=%d vp=%s; files linked, the load in that layout reshards)",
             src, final, cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vp)
    return final


def export(src: Path, out: Path, names: str, with_head: bool) -> tuple[int, int]:
    cfg = checkpoint.config_from_checkpoint(src)
    written = streaming.export_checkpoint(src, out, names, lambda n: with_head or not n.startswith("head."),
                                          metadata={"model": str(cfg.model.preset), "names": names})
    log.info("exported %d tensors (%.1fM parameters) to %s", written[0], written[1] / 1e6, out)
    return written


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
        if int(os.environ.get("RANK", 0)) != 0:  # one process does it all; under torchrun, rank 0
            return
        check_args()
        if args.command == "reshard":
            bad = [o for o in args.overrides if not o.startswith("parallel.")]
            if bad:
                raise ConfigError(f"only parallel.* settings may change when resharding, got {bad}")
            reshard(args.src, args.dst, args.overrides)
        else:
            export(args.src, args.out, args.names, args.with_head)

    return parallel.run_cli("reshard_checkpoint", body, (ConfigError, checkpoint.CheckpointError))
