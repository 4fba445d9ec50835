"""The loop's checkpoint saves: written in the background through megatron-core's AsyncCallsQueue
(train.async_save) or at once, published between steps once every rank's write is complete, and
the training stall of each save measured (the start-up summary's Young/Daly interval reads it back
from metrics.jsonl).

Background writes: megatron's TemporalAsyncCaller forks the trainer for each save, so the child
writes a copy-on-write snapshot of the state while training changes the parameters (on a GPU the
tensors are first copied to host memory). ``latest`` moves in the finalize step, on every rank
together, only after all writers have ended and torch's finalize has found every write
successful; a trainer killed before that leaves only a ``.tmp_step_*`` directory, which resumes
ignore and the next save removes.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from aim_megatron.checkpoint import checkpointer as checkpoint
from aim_megatron.config import Config
from aim_megatron.training.metrics import MetricsLogger


class CheckpointSaver:
    """Every rank calls each method in the same order: each holds collectives."""

    def __init__(self, cfg: Config, root: Path, metrics: MetricsLogger):
        self.cfg, self.root, self.metrics = cfg, Path(root), metrics
        self.queue = AsyncCallsQueue() if cfg.train.async_save else None
        self.strategy = checkpoint.save_strategy(cfg.train.fully_parallel_save)  # caches the spread
        self.validated = False   # sharding checked by this run's first save
        self.pending: Optional[checkpoint.PendingSave] = None
        self.last_step: Optional[int] = None   # step of the newest save started or loaded

    def save(self, step: int, model: list, optimizer, scheduler, trainer_state: dict,
             data_state, wait: bool = False) -> None:
        """Save ``step``; with ``wait`` (the final and signal-time saves) or train.async_save off,
        the checkpoint is complete and published on return. The previous background save is
        finished first: one write at a time."""
        start = time.perf_counter()
        self.finish()
        pending = checkpoint.start_save(self.root, step, self.cfg, model, optimizer, scheduler,
                                        trainer_state, data_state, keep_last=self.cfg.train.keep_last,
                                        strategy=self.strategy, validate=not self.validated)
        self.validated = True
        self.last_step = step
        if self.queue is None or wait:
            pending.request.execute_sync()
            self._published(pending)
        else:
            self.queue.schedule_async_request(pending.request)
            self.pending = pending
        self.metrics.log_checkpoint(step, time.perf_counter() - start, background=self.pending is not None)

    def poll(self) -> None:
        """Between steps: publish the background save if every rank's write has ended."""
        if self.pending is not None and self.queue.maybe_finalize_async_calls(blocking=False):
            self._published(self.pending)

    def finish(self) -> None:
        """Wait for the background save, if any, and publish it."""
        if self.pending is not None:
            self.queue.maybe_finalize_async_calls(blocking=True)
            self._published(self.pending)

    def abort(self) -> None:
        """On the way out after an error: end a background writer without publishing (its
        ``.tmp_step_*`` directory is ignored by resumes and removed by the next save)."""
        if self.queue is not None:
            # The queue's own close(abort=True) ends only a persistent worker, not forked ones.
            for call in self.queue.async_calls:
                call.async_caller.close(abort=True)
            self.queue.async_calls.clear()
        self.pending = None

    def _published(self, pending: checkpoint.PendingSave) -> None:
        self.pending = None
        self.metrics.line(f"saved checkpoint {pending.final}")
