#!/usr/bin/env python
"""Training stall per checkpoint, synchronous vs asynchronous saves, on gloo ranks (torchrun).

    python benchmarks/checkpoint_stall.py                       # 2 ranks, ~302M parameters, fp32
    python benchmarks/checkpoint_stall.py --hidden 1024         # ~75M, for a machine with less memory

Runs aim-pretrain twice with the same wide custom model (AdamW, fp32):
train.async_save=false, then true. Each run saves once mid-run (train.save_interval, the loop's
interval save) and once at the end. The stall of a save is how long the training loop waited in
it, as the trainer records it in checkpoint_stalls.jsonl: for a synchronous save the whole write,
for an asynchronous one the snapshot and planning (the files are written by a forked process
while the next steps run). The final save always completes before the exit in both modes, and
in the async run it first waits for the mid-run write if that is still going: it is shown, not
compared. Also shown: wall time of the steps after the mid-run save, where the background writer
competes with training for this machine's cores.

Size: the default (~302M trunk parameters, AdamW replicated on each rank, a 3.6 GB checkpoint)
peaked at 13.9 GB used on the 24 GB development machine for the two ranks together (2026-12-05);
run it on an otherwise idle machine. With ``--distributed-optimizer`` a ~300M run was killed by the
OOM killer in its first synchronous save (one rank peaked at 11.6 GB, three times its 3.9 GB while
training: the fully reshardable optimizer state is gathered into new tensors for each save).

The last line is exactly ``checkpoint stall async/sync: R`` (mid-run save, async over sync).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, nproc: int, overrides: list[str]) -> float:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "aim_megatron.train", "--resume", "none", f"train.output_dir={out}", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"checkpoint_stall: aim-pretrain failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps-after-save", type=int, default=6,
                    help="steps between the mid-run save and the end (time for the background write)")
    ap.add_argument("--distributed-optimizer", action="store_true",
                    help="shard AdamW's state over the data-parallel ranks (its checkpoint format, fully "
                         "reshardable, gathers that state before every save: a stall async cannot hide)")
    ap.add_argument("--optimizer-format", default="fully_reshardable", choices=["fully_reshardable", "dp_reshardable"],
                    help="train.optimizer_checkpoint_format with --distributed-optimizer (dp_reshardable: no gather)")
    ap.add_argument("--dir", type=Path, default=None, help="where the runs write (default: a temp dir)")
    args = ap.parse_args(argv)
    save_at = 2
    iters = save_at + args.steps_after_save
    model = [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
             f"model.num_heads={max(1, args.hidden // 128)}", "model.image_size=16", "model.patch_size=8",
             "model.in_channels=1", "model.head_hidden_size=128", "model.head_ffn_hidden_size=256",
             "model.head_num_layers=1", "model.prefix_min=1", "model.prefix_max=3"]
    train = ["train.micro_batch_size=1", f"train.global_batch_size={args.nproc}",
             f"train.train_iters={iters}", f"train.save_interval={save_at}", "train.keep_last=1",
             "train.params_dtype=fp32", "train.log_interval=1", "train.eval_interval=0",
             "train.eval_iters=1", "train.tensorboard=false",
             f"parallel.use_distributed_optimizer={str(args.distributed_optimizer).lower()}",
             f"train.optimizer_checkpoint_format={args.optimizer_format}"]
    rows = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for mode in ("sync", "async"):
            out = Path(tmp) / mode
            wall = run(out, args.nproc, model + train + [f"train.async_save={str(mode == 'async').lower()}"])
            stalls = records(out / "checkpoint_stalls.jsonl")
            steps = [r for r in records(out / "metrics.jsonl") if "images_per_s" in r]
            # train.log_interval=1: each record is one step of global_batch_size images.
            step_s = {r["step"]: args.nproc / r["images_per_s"] for r in steps}
            after = sum(s for step, s in step_s.items() if save_at < step <= iters)
            mid = next(r for r in stalls if r["step"] == save_at)
            final = next(r for r in stalls if r["step"] == iters)
            rows[mode] = {"mid_s": mid["stall_s"], "final_s": final["stall_s"], "after_s": after,
                          "wall_s": wall}
            rows[mode]["ckpt_gb"] = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*")
                                        if f.is_file()) / 1e9
    params = 12 * args.hidden ** 2 * args.layers
    optimizer = (f"distributed optimizer, {args.optimizer_format}" if args.distributed_optimizer
                 else "replicated on each rank")
    print(f"{args.nproc} gloo ranks, ~{params / 1e6:.0f}M trunk parameters, fp32, AdamW ({optimizer}), "
          f"checkpoint {rows['sync']['ckpt_gb']:.2f} GB")
    print(f"{'mode':<6} {'mid-run save stall':>19} {'final save':>11} {'steps after save':>17} {'run wall':>9}")
    for mode, r in rows.items():
        print(f"{mode:<6} {r['mid_s']:>17.2f} s {r['final_s']:>9.2f} s {r['after_s']:>15.2f} s "
              f"{r['wall_s']:>7.1f} s")
    print(f"checkpoint stall async/sync: {rows['async']['mid_s'] / rows['sync']['mid_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
