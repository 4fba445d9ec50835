"""This rank's part of the data: which ranks read images (and which only receive them), opening
the training and validation loaders, and the micro-batches of a global batch with their prefix
lengths. A problem found by a reading rank is shared with every rank (``agree_on_error``), so that
none goes on into training and waits there for a peer that has failed."""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from aim_megatron import cli
from aim_megatron import data
from aim_megatron.config import Config, num_microbatches
from aim_megatron.distributed import cpu_shims


class DataError(RuntimeError):
    """A data source that a reading rank could not open; every rank raises it together."""


def agree_on_error(problem: Optional[str], error: Optional[type[Exception]] = None) -> None:
    """Share a problem found by any rank with all of them (one collective), so that no rank goes
    on into training and waits there for a peer that has failed. Raises ``error`` (default
    DataError) everywhere."""
    problems: list[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    found = [(rank, text) for rank, text in enumerate(problems) if text]
    if found:
        rank, text = found[0]
        raise (error or DataError)(text if rank == 0 else f"(rank {rank}) {text}")


class BatchFeed:
    """Micro-batches for this rank, in the parallel layout set up by ``parallel.initialize``."""

    def __init__(self, cfg: Config, world: int):
        self.cfg = cfg
        self.n_micro = num_microbatches(cfg, world)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        first_stage = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        # Images are needed by the first stage (embedding) and the last (targets). Within a TP
        # group only rank 0 reads and broadcasts; pipeline middle stages read nothing.
        self.needs_images = first_stage or last_stage
        self.reads_data = self.needs_images and tp_rank == 0
        # Held-out data: data.val_sources (resize + center crop, fixed order); a synthetic
        # training set is validated on synthetic images of the "val" split.
        self.val_cfg = cfg
        if not cfg.data.val_sources and all(s == "synthetic" for s in cfg.data.train_sources):
            self.val_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_sources=["synthetic"]))
        self.has_val = bool(self.val_cfg.data.val_sources)

    def open_train_loader(self, given: Optional[Iterator] = None) -> Optional[Iterator]:
        """This rank's training loader (``given``, else built from the config); None on ranks that
        read nothing. Collective: a source that fails on any reading rank fails every rank."""
        loader, problem = None, None
        # Every rank: global rank 0 reads the manifests/listings once and broadcasts them, so
        # start-up file operations do not grow with ranks x shards (errors surface below).
        data.resolve_sources(self.cfg)
        if self.reads_data:
            try:
                loader = given or data.build_loader(self.cfg, self.dp_rank, self.dp_size,
                                                    self.cfg.train.micro_batch_size)
                # The validation loader is built at each evaluation: open its sources now, so a
                # bad one fails at start and not at the first evaluation hours later.
                for spec in self.cfg.data.val_sources:
                    data.resolve_source(spec, "data.val_sources")
            except (ValueError, ImportError) as exc:
                problem = cli.one_line(exc)
        agree_on_error(problem)
        return loader

    def open_val_loader(self) -> Optional[Iterator]:
        """A fresh held-out loader (the same batches every time); None on ranks that read nothing."""
        if not self.reads_data:
            return None
        return data.build_loader(self.val_cfg, self.dp_rank, self.dp_size,
                                 self.cfg.train.micro_batch_size, split="val")

    def fetch_images(self, loader) -> Optional[torch.Tensor]:
        m, mbs = self.cfg.model, self.cfg.train.micro_batch_size
        if not self.needs_images:
            return None
        device = cpu_shims.device()
        if self.reads_data:
            images = next(loader)["images"].to(device, torch.float32)
        else:
            images = torch.empty(mbs, m.in_channels, m.image_size, m.image_size, device=device)
        if self.cfg.parallel.tp > 1:
            dist.broadcast(images, src=parallel_state.get_tensor_model_parallel_src_rank(),
                           group=parallel_state.get_tensor_model_parallel_group())
        return images

    def microbatches(self, step: int, loader) -> list[dict]:
        """This rank's micro-batches of global batch ``step``. Prefix lengths are a function of
        the sample positions, so ranks that read no images compute the same ones."""
        mbs = self.cfg.train.micro_batch_size
        return [{"images": self.fetch_images(loader),
                 "prefix_len": data.microbatch_prefix_lengths(self.cfg, self.dp_rank, self.dp_size, mbs,
                                                              step * self.n_micro + i)}
                for i in range(self.n_micro)]
