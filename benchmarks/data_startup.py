#!/usr/bin/env python
"""File-system operations and wall time of data start-up per rank: source resolution + loader construction.

    python benchmarks/data_startup.py                           # 1k/20k/200k shards x 1/8/64 ranks
    python benchmarks/data_startup.py --shards 1000 --ranks 2 8 --json rows.json

Each shard set is synthetic and made once in a temporary directory (or ``--dir``): a manifest.json
listing ``--samples-per-shard`` samples per shard, one DALI index per shard (hard links to one
small .idx, so 200k shards are made in seconds) and empty .tar files: start-up never reads a tar,
it only checks that the tars this rank reads exist.

Ranks are simulated in this one process, as the training start-up runs them:
- resolution: rank 0 (the reader) resolves the sources (``data.resolve_sources``, what it does
  before broadcasting); every other rank receives the pickled description (what
  ``broadcast_object_list`` sends, its size is reported) and resolves from it.
- loader construction: the torch/PIL loader of data-parallel rank r of R (``build_loader`` with
  dp_rank/dp_size); measured for rank 0 and rank R-1. (The DALI loader opens the same shards, but
  from C++, which the counter below cannot see.)

Operations are counted by wrapping, in this process, ``open`` (builtins and io: every Python-level
file open, pathlib's included), ``os.stat`` and ``os.lstat`` (so ``os.path.isfile``/``exists`` and
pathlib's ``is_file``/``exists`` count once each), ``os.scandir`` and ``os.listdir`` (a directory
listing counts once, however many entries it returns). Memory-mapped or C-level opens are not seen.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from aim_megatron import data
from aim_megatron.config import load_config
from aim_megatron.data import sources as sources_mod
from aim_megatron.data.file_ops import FileOps

def make_shard_set(root: Path, num_shards: int, samples_per_shard: int) -> Path:
    """A manifest, one index and one empty tar per shard under ``root`` (reused when complete)."""
    out = root / f"shards_{num_shards}"
    manifest = out / "manifest.json"
    if manifest.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    proto_idx, proto_tar = out / ".proto.idx", out / ".proto.tar"
    lines = [f"v1.2 {samples_per_shard}"]
    for i in range(samples_per_shard):
        lines.append(f"png {1024 * (2 * i) + 512} 100 {i:09d}.png cls {1024 * (2 * i + 1) + 512} 1 {i:09d}.cls")
    proto_idx.write_text("\n".join(lines) + "\n")
    proto_tar.touch()
    shards = []
    for i in range(num_shards):
        name = f"shard-{i:06d}"
        if i % 60000 == 0 and i:   # a file system caps links per file (ext4: 65,000): fresh copies
            proto_idx = Path(shutil.copyfile(proto_idx, out / f".proto{i}.idx"))
            proto_tar = Path(shutil.copyfile(proto_tar, out / f".proto{i}.tar"))
        os.link(proto_idx, out / f"{name}.idx")
        os.link(proto_tar, out / f"{name}.tar")
        shards.append({"tar": f"{name}.tar", "index": f"{name}.idx", "num_samples": samples_per_shard})
    manifest.write_text(json.dumps({"format": "webdataset", "num_shards": num_shards, "shards": shards}))
    return out


def measure(shard_dir: Path, ranks: int, samples_per_shard: int) -> dict:
    cfg = load_config(None, [f"data.train_sources=[{shard_dir}]", "data.loader=torch", "data.num_workers=0",
                             "train.micro_batch_size=2", f"train.global_batch_size={2 * ranks}",
                             "model.image_size=16", "model.patch_size=4", "model.in_channels=1"])
    field = "data.train_sources"
    row = {"shards": int(shard_dir.name.split("_")[1]), "ranks": ranks}
    with FileOps() as ops:
        data.forget_shared_sources()
        t0 = time.perf_counter()
        shared = data.resolve_sources(cfg)                     # rank 0: what it broadcasts
        row["reader_resolve_s"] = time.perf_counter() - t0
        row["reader_resolve_ops"] = len(ops.reset())
        payload = pickle.dumps(shared)
        row["broadcast_mb"] = len(payload) / 1e6
        # Any other rank: the broadcast description, then the loaders' look-up of it.
        t0 = time.perf_counter()
        sources_mod._shared.clear()
        sources_mod._shared.update(pickle.loads(payload))
        src = data.resolve_source(str(shard_dir), field)
        row["other_resolve_s"] = time.perf_counter() - t0
        row["other_resolve_ops"] = len(ops.reset())
        for name, rank in (("first", 0), ("last", ranks - 1))[:2 if ranks > 1 else 1]:
            t0 = time.perf_counter()
            loader = data.build_loader(cfg, rank, ranks, 2, sources=[src])
            row[f"loader_{name}_s"] = time.perf_counter() - t0
            calls = ops.reset()
            row[f"loader_{name}_ops"] = len(calls)
            row[f"loader_{name}_by_op"] = dict(Counter(op for op, _ in calls))
            loader.close()
    data.forget_shared_sources()
    if ranks == 1:     # rank R-1 is rank 0
        row.update({k.replace("first", "last"): v for k, v in row.items() if k.startswith("loader_first")})
    row["samples"] = src.num_samples
    assert src.num_samples == row["shards"] * samples_per_shard
    return row


def table(rows: list[dict]) -> str:
    out = ["| shards | ranks | reader: resolve ops / s | other ranks: resolve ops / s | broadcast MB | "
           "loader rank 0: ops / s | loader rank R-1: ops / s |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['shards']:,} | {r['ranks']} | {r['reader_resolve_ops']} / {r['reader_resolve_s']:.3f} | "
                   f"{r['other_resolve_ops']} / {r['other_resolve_s']:.3f} | {r['broadcast_mb']:.2f} | "
                   f"{r['loader_first_ops']:,} / {r['loader_first_s']:.2f} | "
                   f"{r['loader_last_ops']:,} / {r['loader_last_s']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, nargs="+", default=[1000, 20000, 200000])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--samples-per-shard", type=int, default=4)
    ap.add_argument("--dir", help="where to make (and keep) the shard sets; default: a temporary directory")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="aim-data-startup-"))
    rows = []
    try:
        for n in args.shards:
            t0 = time.perf_counter()
            shard_dir = make_shard_set(root, n, args.samples_per_shard)
            print(f"{n:,} shards ready in {time.perf_counter() - t0:.1f} s", flush=True)
            for ranks in args.ranks:
                rows.append(measure(shard_dir, ranks, args.samples_per_shard))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
