"""Image data: where samples come from and how they reach a data-parallel rank.

- ``sources``: what a source holds (WebDataset shards, image folders, synthetic), found once per job
  (:func:`resolve_sources`: rank 0 reads, every rank gets it) and opened per rank, shard by shard.
- ``base``: per-sample prefix lengths, weighted mixing, resumable streams and the loader interface
  every backend implements.
- ``dali``: the NVIDIA DALI backend (GPU ``mixed`` decode on GPUs, CPU pipelines elsewhere).
- ``pil``: the PIL/torch DataLoader backend (the fallback when DALI does not import).
- ``shards``: writing and reading WebDataset shards, their indexes and manifests.
- ``local_datasets``: real image data installed from Debian packages (Fashion-MNIST, photos).

This module picks a backend (:func:`build_loader`); the backends import ``base``, never this
module, so there is no import circle.
"""
from __future__ import annotations

import logging
from typing import Optional

from aim_megatron.config import Config
from aim_megatron.data.base import (DALI_INSTALL_HINT, Chunk, ImageLoader, SourceStream, SyntheticLoader,
                                    SyntheticStream, assign_sources, derive_seed, eval_resize_size,
                                    hash_uniform, microbatch_prefix_lengths, normalize_, prefix_lengths,
                                    sample_positions, shard_bounds)
from aim_megatron.data.sources import (DataSourceError, Source, check_source_paths, forget_shared_sources,
                                       resolve_source, resolve_sources)

logger = logging.getLogger(__name__)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def select_loader_kind(requested: str = "auto") -> str:
    """'dali' or 'torch' for ``data.loader``; "auto" takes DALI when it imports."""
    if requested == "torch":
        return "torch"
    if requested not in ("auto", "dali"):
        raise ValueError(f"data.loader={requested!r}: use auto, dali or torch")
    if dali_available():
        return "dali"
    if requested == "dali":
        raise ImportError(f"data.loader=dali but NVIDIA DALI is not importable; {DALI_INSTALL_HINT} "
                          f"(or set data.loader=torch)")
    return "torch"


def build_loader(cfg: Config, dp_rank: int, dp_size: int, micro_batch_size: int,
                 split: str = "train", sources: Optional[list[Source]] = None) -> ImageLoader:
    """The loader of one data-parallel rank, per ``data.loader``; logs which one it is.

    split="train" reads ``data.train_sources`` with the training augmentation; split="val" reads
    ``data.val_sources`` in stored order with the official deterministic center crop (shorter side to
    eval_resize_size(image_size) = image_size / 0.875, bicubic, then the centred image_size square)
    and no flip or jitter. Both are endless and resumable. ``sources``: the split's resolved sources
    (default: what :func:`resolve_sources` shared at start-up, else resolved here); the loader opens
    only the shards this rank reads."""
    specs = cfg.data.train_sources if split == "train" else cfg.data.val_sources
    if specs and all(s == "synthetic" for s in specs):
        logger.info("data loader (%s): synthetic images", split)
        return SyntheticLoader(cfg, dp_rank, dp_size, micro_batch_size, split=split, sources=sources)
    kind = select_loader_kind(cfg.data.loader)
    if kind == "dali":
        from aim_megatron.data.dali import DaliImageLoader, select_dali_placement
        import nvidia.dali
        placement = select_dali_placement(cfg.data.dali_device)
        logger.info("data loader (%s): NVIDIA DALI %s (%s) for %s", split, nvidia.dali.__version__,
                    placement.describe(), specs)
        return DaliImageLoader(cfg, dp_rank, dp_size, micro_batch_size, split=split, placement=placement,
                               sources=sources)
    from aim_megatron.data.pil import TorchImageLoader
    reason = "data.loader=torch" if cfg.data.loader == "torch" else \
        f"NVIDIA DALI is not importable ({DALI_INSTALL_HINT} to use it)"
    logger.info("data loader (%s): torch/PIL fallback with %d workers (%s) for %s", split,
                cfg.data.num_workers, reason, specs)
    return TorchImageLoader(cfg, dp_rank, dp_size, micro_batch_size, split=split, sources=sources)


__all__ = [
    "Source", "Chunk", "SourceStream", "SyntheticStream", "ImageLoader", "SyntheticLoader", "build_loader",
    "select_loader_kind", "dali_available", "prefix_lengths", "microbatch_prefix_lengths",
    "sample_positions", "assign_sources", "shard_bounds", "resolve_source", "hash_uniform", "derive_seed",
    "normalize_", "DataSourceError", "check_source_paths", "eval_resize_size", "resolve_sources",
    "forget_shared_sources",
]
