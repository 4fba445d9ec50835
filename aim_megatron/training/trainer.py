"""The training loop: ``Trainer`` builds the model, optimizer and schedule, resumes, steps, evaluates
and saves, and calls the components that do the rest (batches, metrics, preemption, watchdog).

The same code runs on one CPU process, N gloo processes and N GPUs/nodes (NCCL).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from aim_megatron import cli
from aim_megatron.checkpoint import checkpointer as checkpoint
from aim_megatron.config import Config
from aim_megatron.distributed import parallel
from aim_megatron.training.batches import BatchFeed, agree_on_error
from aim_megatron.training.checkpointing import CheckpointSaver
from aim_megatron.training.exit_codes import EXIT_OK
from aim_megatron.training.metrics import MetricsLogger
from aim_megatron.training.optim import build_scheduler, guarded_optimizer_step
from aim_megatron.training.preemption import StopRequests, signal_proof_checkpoint_writer
from aim_megatron.training.watchdog import HangWatchdog, start_hang_watchdog


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient; nothing poisoned is saved."""


class Trainer:
    """One rank's training run. Every rank calls the same methods in the same order: each holds
    collectives."""

    def __init__(self, cfg: Config, world: int, train_loader: Optional[Iterator] = None):
        self.cfg, self.world = cfg, world
        self.model = parallel.build_model(cfg)
        self.optimizer = parallel.build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.batches = BatchFeed(cfg, world)
        self.n_micro = self.batches.n_micro
        self.train_loader = self.batches.open_train_loader(train_loader)
        self.out_dir = Path(cfg.train.output_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.step = 0
        self.skipped_steps = 0
        self.bad_in_row = 0
        self.is_logger = dist.get_rank() == 0
        self.metrics = MetricsLogger(cfg, world, self.is_logger)
        self.saver = CheckpointSaver(cfg, self.ckpt_root, self.metrics)
        self.stop = StopRequests(self.out_dir, self.is_logger)
        self.watchdog: Optional[HangWatchdog] = None

    def save(self, background: bool = False) -> None:
        """Checkpoint this step: complete on return, or with ``background`` (the loop's interval
        saves) written while training goes on when train.async_save is on."""
        parallel.finish_param_sync(self.cfg, self.model)
        state = {"step": self.step, "skipped_steps": self.skipped_steps}
        data_state = self.train_loader.state_dict() if self.train_loader is not None else None
        self.saver.save(self.step, self.model, self.optimizer, self.scheduler, state, data_state,
                        wait=not background)

    def resume(self, which: str = "auto") -> bool:
        if which == "none":
            return False
        if which == "auto":  # a damaged newest checkpoint falls back to an older one
            found = checkpoint.load_newest_readable(self.ckpt_root, self.cfg, self.model,
                                                    self.optimizer, self.scheduler)
            if found is None:
                return False
            path, restored = found
        else:
            path = checkpoint.resolve(self.ckpt_root, which)
            restored = checkpoint.load(path, self.cfg, self.model, self.optimizer, self.scheduler)
        self.step = restored["trainer"]["step"]
        self.skipped_steps = restored["trainer"]["skipped_steps"]
        problem = None
        if self.train_loader is not None:
            try:  # only data-reading ranks get here: all must learn of a refusal (no hang)
                if restored["data"] is not None:
                    self.train_loader.load_state_dict(restored["data"])
                else:  # another layout: continue at the right sample positions, streams restart
                    self.train_loader.seek(self.step * self.n_micro)
            except ValueError as exc:
                problem = f"{path}: {cli.one_line(exc)}"
        agree_on_error(problem, checkpoint.CheckpointError)
        self.saver.last_step = self.step
        self.metrics.line(f"resumed from {path} at step {self.step}")
        return True

    def train_step(self) -> dict:
        mbs = self.batches.microbatches(self.step, self.train_loader)
        self.optimizer.zero_grad()
        loss = parallel.forward_backward(self.cfg, self.model, mbs)
        stepped, grad_norm = guarded_optimizer_step(self.optimizer, loss)
        if stepped:
            self.scheduler.step(increment=1)
            self.bad_in_row = 0
        else:
            self.skipped_steps += 1
            self.bad_in_row += 1
            self.metrics.line(f"step {self.step + 1}: non-finite loss {loss} or grad norm {grad_norm}; "
                              f"step skipped ({self.bad_in_row} in a row)", level=logging.WARNING)
            if self.bad_in_row >= self.cfg.train.max_bad_steps:
                self.saver.finish()  # the last good checkpoint, if still being written, is kept
                raise TrainingDiverged(
                    f"{self.bad_in_row} consecutive steps with non-finite loss/gradients at step "
                    f"{self.step + 1}; stopping without saving. Resume from the last good checkpoint "
                    f"in {self.ckpt_root} with a lower train.lr or check the data")
        self.step += 1
        return {"loss": loss, "grad_norm": grad_norm, "stepped": stepped,
                "lr": self.optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean loss over train.eval_iters fixed held-out global batches (the same every time)."""
        if not self.batches.has_val:
            return None
        for chunk in self.model:
            chunk.eval()
        loader = self.batches.open_val_loader()
        try:
            total = sum(parallel.forward_backward(self.cfg, self.model,
                                                  self.batches.microbatches(i, loader),
                                                  forward_only=True)
                        for i in range(self.cfg.train.eval_iters))
        finally:
            if loader is not None:
                loader.close()
            for chunk in self.model:
                chunk.train()
        return total / self.cfg.train.eval_iters

    def run(self) -> int:
        t = self.cfg.train
        signal_proof_checkpoint_writer()
        self.metrics.open()
        if self.stop.requested():  # signalled during start-up or resume
            return self._checkpoint_for_requeue()
        # After the ranks' first meeting: start-up (imports, build, resume) takes each rank its own
        # time (rank 0 also measures a matmul for the summary), and a timeout sized for steps
        # would fire on a rank that waits there for a slower peer (seen with 8 s under load).
        self.watchdog = start_hang_watchdog(t.hang_timeout_s, self.out_dir / "heartbeat", dist.get_rank(),
                                            dist.get_world_size(), self.step, self.stop.marker())
        self.metrics.start_steps(self.step)
        first_step = self.step
        while self.step < t.train_iters:
            result = self.train_step()
            self.saver.poll()
            if self.watchdog is not None:
                self.watchdog.beat(self.step)
            self.metrics.step_done(self.step, result, self.skipped_steps)
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.train_iters:
                self.metrics.log_eval(self.step, self.evaluate())
            if self.stop.requested():
                return self._checkpoint_for_requeue()
            if t.exit_after_steps and self.step - first_step >= t.exit_after_steps \
                    and self.step < t.train_iters:
                self.metrics.line(f"train.exit_after_steps reached at step {self.step}: checkpointing")
                self.save()
                return EXIT_OK
            if t.save_interval and self.step % t.save_interval == 0 and self.step < t.train_iters:
                self.save(background=True)
        self.metrics.end_steps()
        self.metrics.log_eval(self.step, self.evaluate())
        self.save()
        self.metrics.log_complete(self.step, self.skipped_steps)
        return EXIT_OK

    def _checkpoint_for_requeue(self) -> int:
        self.saver.finish()  # a background save in flight completes before the exit
        return self.stop.checkpoint_for_requeue(self.step, self.saver.last_step,
                                                self.save)

    def close(self) -> None:
        self.saver.abort()  # left only on an error: every normal way out finishes its save
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.train_loader is not None and hasattr(self.train_loader, "close"):
            self.train_loader.close()
        self.metrics.close()
