"""Build WebDataset shards (+ DALI index files, sha256 checksums, manifest.json) for aim-megatron.

    # an image folder (class sub-folders become labels); re-encode to at most 512 px per side
    python tools/make_shards.py --folder /data/imagenet/train --out shards/in1k --max-side 512 --workers 8
    # Fashion-MNIST from the Debian package (scripts/install_data.sh)
    python tools/make_shards.py --fashion-mnist train --out shards/fmnist-train
    # any labelled IDX pair
    python tools/make_shards.py --idx-images imgs.gz --idx-labels labels.gz --out shards/x
    # DALI index for existing tars / re-check checksums of a shard directory
    python tools/make_shards.py --index-only shards/a.tar shards/b.tar
    python tools/make_shards.py --verify shards/in1k

Corrupt, truncated, empty and non-image files are skipped, counted and listed in the manifest; the
run ends with a summary and never stops on a bad file. Sample order is shuffled once (--shuffle-seed)
because DALI shuffles only through a buffer.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aim_megatron.cli import ArgumentParser
from aim_megatron.data.local_datasets import FASHION_MNIST_CLASSES, fashion_mnist
from aim_megatron.data.shards import (read_idx, shards_from_arrays, shards_from_folder, verify_manifest,
                                      write_wds_index)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="image folder (recursively; first-level sub-folders = classes)")
    src.add_argument("--fashion-mnist", choices=["train", "test"], help="Debian dataset-fashion-mnist split")
    src.add_argument("--idx-images", help="IDX images file (.gz ok); labels via --idx-labels")
    src.add_argument("--index-only", nargs="+", metavar="TAR", help="only write DALI .idx files for tars")
    src.add_argument("--verify", metavar="DIR", help="re-hash the shards a manifest.json lists")
    p.add_argument("--idx-labels", help="IDX labels file matching --idx-images")
    p.add_argument("--out", help="output directory")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    p.add_argument("--samples-per-shard", type=int, default=10000)
    p.add_argument("--max-side", type=int, default=None, help="downscale larger images (re-encoded JPEG q90)")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the one-time shuffle")
    p.add_argument("--no-shuffle", action="store_true", help="keep the input order")
    p.add_argument("--workers", type=int, default=1, help="processes decoding/checking images")
    p.add_argument("--limit", type=int, default=None, help="use only the first N (shuffled) inputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("samples_per_shard", "max_side", "workers", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} {value}: must be >= 1")

    if args.index_only:
        for tar in args.index_only:
            if not Path(tar).is_file():
                print(f"error: --index-only {tar}: no such file; pass existing .tar shards", file=sys.stderr)
                return 1
            print(f"{write_wds_index(tar)}")
        return 0
    if args.verify:
        if not (Path(args.verify) / "manifest.json").is_file():
            print(f"error: --verify {args.verify}: no manifest.json there; pass a directory make_shards.py "
                  f"wrote", file=sys.stderr)
            return 1
        problems = verify_manifest(args.verify)
        for line in problems:
            print(line)
        print("OK: all checksums match" if not problems else f"FAILED: {len(problems)} problem(s)")
        return 1 if problems else 0
    if not args.out:
        p.error("--out is required")
    seed = None if args.no_shuffle else args.shuffle_seed
    common = dict(prefix=args.prefix, samples_per_shard=args.samples_per_shard, shuffle_seed=seed,
                  limit=args.limit, progress=not args.quiet)
    try:
        if args.folder:
            manifest = shards_from_folder(args.folder, args.out, max_side=args.max_side, workers=args.workers,
                                          **common)
        else:
            if args.fashion_mnist:
                images, labels = fashion_mnist(args.fashion_mnist)
                classes, source = FASHION_MNIST_CLASSES, f"fashion-mnist:{args.fashion_mnist}"
            else:
                images = read_idx(args.idx_images)
                labels = read_idx(args.idx_labels) if args.idx_labels else None
                classes, source = None, str(args.idx_images)
            manifest = shards_from_arrays(images, labels, args.out, classes=classes, source=source,
                                          **common)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {manifest['num_samples']} samples in {manifest['num_shards']} shard(s) to {args.out} "
          f"(+ .idx, manifest.json); skipped {manifest['num_skipped']} file(s)"
          + (f": {manifest['skipped_by_kind']}" if manifest["num_skipped"] else ""))
    for s in manifest["skipped"][:20]:
        print(f"  skipped {s['item']}: {s['reason']}")
    return 0
