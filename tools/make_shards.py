#!/usr/bin/env python
"""Build WebDataset shards (+ DALI index files, sha256 checksums, manifest.json) for aim-megatron;
the logic is aim_megatron/data/make_shards.py (installed as `aim-make-shards`).

    python tools/make_shards.py --folder /data/imagenet/train --out shards/in1k --max-side 512 --workers 8
    python tools/make_shards.py --fashion-mnist train --out shards/fmnist-train
    python tools/make_shards.py --idx-images imgs.gz --idx-labels labels.gz --out shards/x
    python tools/make_shards.py --index-only shards/a.tar shards/b.tar
    python tools/make_shards.py --verify shards/in1k
"""
import sys

from aim_megatron.data.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
