"""Features of labelled images from a frozen trunk: the block outputs the probe reads, computed once
per data-parallel shard and cached in memory or in a memory-mapped file (N x tokens x D floats;
the linear probe caches the token mean only).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from aim_megatron.evaluation.labelled_data import LabelledImages, collate_readable
from aim_megatron.evaluation.probe import is_rank0


@torch.no_grad()
def extract_features(trunk, images: LabelledImages, lo: int, hi: int, layers: list[int],
                     batch_size: int, num_workers: int = 0, mean_tokens: bool = False,
                     dtype: torch.dtype = torch.float32, cache_file: Optional[Path] = None
                     ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Frozen-trunk features of items [lo, hi): ([n, N, D] or the token mean [n, D] in ``dtype``,
    labels [n], names of corrupt images, which are skipped). Collective over the tensor-parallel
    group: its ranks must pass the same items. The cache is allocated once (no concatenation
    copy), since it is the probe's largest memory cost; with ``cache_file`` it is a memory-mapped
    .npy file there (overwritten), so the page cache, not the process, holds it."""
    from aim_megatron.distributed import cpu_shims
    from aim_megatron.data.pil import _single_thread
    trunk.eval()
    m = images.cfg.model
    shape = (m.hidden_size,) if mean_tokens else (m.num_patches, m.hidden_size)
    if cache_file is None:
        feats = torch.empty((hi - lo, *shape), dtype=dtype)
    else:  # numpy has no bfloat16: store its bits as uint16 and view them
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        stored = np.lib.format.open_memmap(cache_file, mode="w+", shape=(hi - lo, *shape),
                                           dtype=np.uint16 if dtype == torch.bfloat16 else np.float32)
        feats = torch.from_numpy(stored).view(dtype)
    labels = torch.empty(hi - lo, dtype=torch.int64)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(images, range(lo, hi)), batch_size=batch_size, collate_fn=collate_readable,
        num_workers=num_workers, worker_init_fn=_single_thread if num_workers else None)
    n, corrupt = 0, []
    from tqdm import tqdm
    bar = tqdm(total=hi - lo, desc=f"features ({images.spec})", unit="img", dynamic_ncols=True,
               file=sys.stderr, disable=None if is_rank0() else True)
    for x, y, bad in loader:
        bar.update(len(y) + len(bad))
        corrupt += bad
        if x is None:
            continue
        f = trunk.block_features(x.to(cpu_shims.device()), layers)
        feats[n:n + len(y)] = (f.mean(dim=1) if mean_tokens else f).to("cpu", dtype)
        labels[n:n + len(y)] = y
        n += len(y)
    bar.close()
    if cache_file is not None:
        stored.flush()
    return feats[:n], labels[:n], corrupt
