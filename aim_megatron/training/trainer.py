"""AIM pre-training loop.

    aim-pretrain --config examples/configs/aim_tiny.yaml train.train_iters=200 parallel.tp=2
    torchrun --nproc_per_node 8 -m aim_megatron.train --config ... [--resume auto|none|PATH]

The same code runs on one CPU process, N gloo processes and N GPUs/nodes (NCCL). Exit codes:
0 finished, 3 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (requeue), 2 diverged
(too many NaN/inf steps in a row; nothing poisoned is saved), 1 bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

# Stop requests (SIGTERM/SIGUSR1) only set this; the loop acts on it between steps. A request that
# arrives during start-up or resume is kept and acted on before the first step, and a repeated
# SIGTERM during the checkpoint write (torchrun forwards the one Slurm already sent) cannot cut it.
_stop_signal = 0


def _record_stop(signum, _frame) -> None:
    global _stop_signal
    _stop_signal = signum


def install_signal_handlers() -> dict:
    """Record SIGTERM/SIGUSR1 instead of dying; returns the previous handlers (to restore)."""
    global _stop_signal
    if threading.current_thread() is not threading.main_thread():
        return {}
    if signal.getsignal(signal.SIGTERM) is not _record_stop:
        _stop_signal = 0  # keep one recorded since the module-level install (python -m)
    return {sig: signal.signal(sig, _record_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}


if __name__ == "__main__":  # python -m aim_megatron.train: before the seconds of torch imports
    install_signal_handlers()


def _die_with_parent() -> None:
    """SIGKILL this process when its parent dies, however the parent ends (os._exit, SIGKILL)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _ignore_stop_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()  # ...and die with the trainer: nothing left behind


def _die_with_torchrun() -> None:
    """torchrun starts each worker in a session of its own, so a kill -9 of torchrun's process
    group (by a user, or a scheduler without cgroups) left the workers training on, orphaned.
    Tie every worker's life to its torchrun; a worker whose torchrun is already gone exits."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    _die_with_parent()
    if os.getppid() == 1:  # torchrun died before the prctl above took effect
        os._exit(EXIT_ERROR)


_write_queue_managers: list = []

# TEST ONLY (tests/test_slurm_watchdog.py): AIM_TEST_ONLY_BLOCK_RANK_AT_STEP="R:S" makes global
# rank R sleep forever before it starts step S+1, while its peers go on into that step's first
# collective and wait there: a rank blocked outside a collective that the hang watchdog must
# name. Unset (always, outside that test) it does nothing.
_TEST_ONLY_BLOCK = os.environ.get("AIM_TEST_ONLY_BLOCK_RANK_AT_STEP", "")


def _test_only_block(step: int) -> None:
    if not _TEST_ONLY_BLOCK:
        return
    rank, at = (int(x) for x in _TEST_ONLY_BLOCK.split(":"))
    if step == at and dist.get_rank() == rank:
        log.warning("AIM_TEST_ONLY_BLOCK_RANK_AT_STEP: rank %d blocks before step %d (test hook)",
                    rank, step + 1)
        while True:
            time.sleep(1)


def signal_proof_checkpoint_writer() -> None:
    """megatron's checkpoint writer gets its results through a multiprocessing Manager that it
    spawns at the first save, with default signal handlers. Slurm signals every process of a job
    step, so on preemption the Manager died and the save failed (EOFError). Start it here, before
    any signal, ignoring the stop signals (it is still killed with the step)."""
    from multiprocessing import get_context
    from multiprocessing.managers import SyncManager
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        return
    manager = SyncManager(ctx=get_context("spawn"))
    manager.start(initializer=_ignore_stop_signals)
    _write_queue_managers.append(manager)
    filesystem_async._results_queue = manager.Queue()

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from aim_megatron import cli
from aim_megatron.checkpoint import checkpointer as checkpoint
from aim_megatron.distributed import cpu_shims
from aim_megatron.distributed import parallel
from aim_megatron.config import Config, ConfigError, load_config, num_microbatches, resolve_params_dtype
from aim_megatron.scaling.flops import device_peak_tflops, train_flops_per_image
from aim_megatron import data
from aim_megatron.training.watchdog import HangWatchdog

log = logging.getLogger("aim_megatron.train")

EXIT_OK, EXIT_ERROR, EXIT_DIVERGED, EXIT_REQUEUE = 0, 1, 2, 3


class TrainingDiverged(RuntimeError):
    pass


class DataError(RuntimeError):
    """A data source that a reading rank could not open; every rank raises it together."""


def _agree_on_error(problem: Optional[str], error: Optional[type[Exception]] = None) -> None:
    """Share a problem found by any rank with all of them (one collective), so that no rank goes
    on into training and waits there for a peer that has failed. Raises ``error`` (default
    DataError) everywhere."""
    problems: list[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    found = [(rank, text) for rank, text in enumerate(problems) if text]
    if found:
        rank, text = found[0]
        raise (error or DataError)(text if rank == 0 else f"(rank {rank}) {text}")


# ml-l3m starts its warmup at 1e-6, not 0: the first step already moves the weights.
WARMUP_START_LR = 1e-6


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """Linear warmup from WARMUP_START_LR over the first warmup_fraction of training, then cosine
    to min_lr (ml-l3m's aim_v1 schedule: LinearParamScheduler(1e-6 -> lr), then cosine)."""
    t = cfg.train
    warmup = int(round(t.warmup_fraction * t.train_iters))
    return OptimizerParamScheduler(
        optimizer, init_lr=min(WARMUP_START_LR, t.effective_lr), max_lr=t.effective_lr, min_lr=t.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=t.train_iters, lr_decay_style="cosine",
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.train_iters,
        wd_incr_style="constant")


def guarded_optimizer_step(optimizer, loss: float) -> tuple[bool, float]:
    """megatron's optimizer step with a finiteness check *before* any update: a NaN/inf loss or
    gradient norm skips the step. Returns (stepped, grad_norm)."""
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not math.isfinite(loss) or not math.isfinite(grad_norm):
        return False, grad_norm
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if opt.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm)
    return bool(optimizer.step_with_ready_grads()), grad_norm


class Trainer:
    def __init__(self, cfg: Config, world: int, train_loader: Optional[Iterator] = None):
        self.cfg, self.world = cfg, world
        t = cfg.train
        self.model = parallel.build_model(cfg)
        self.optimizer = parallel.build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.n_micro = num_microbatches(cfg, world)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.first_stage = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        self.last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        # Images are needed by the first stage (embedding) and the last (targets). Within a TP
        # group only rank 0 reads and broadcasts; pipeline middle stages read nothing.
        self.needs_images = self.first_stage or self.last_stage
        self.reads_data = self.needs_images and self.tp_rank == 0
        self.train_loader = None
        # Held-out data: data.val_sources (resize + center crop, fixed order); a synthetic
        # training set is validated on synthetic images of the "val" split.
        self.val_cfg = cfg
        if not cfg.data.val_sources and all(s == "synthetic" for s in cfg.data.train_sources):
            self.val_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_sources=["synthetic"]))
        self.has_val = bool(self.val_cfg.data.val_sources)
        problem = None
        if self.reads_data:
            try:
                self.train_loader = train_loader or data.build_loader(
                    cfg, self.dp_rank, self.dp_size, t.micro_batch_size)
                # The validation loader is built at each evaluation: open its sources now, so a
                # bad one fails at start and not at the first evaluation hours later.
                for spec in cfg.data.val_sources:
                    data.resolve_source(spec, "data.val_sources")
            except (ValueError, ImportError) as exc:
                problem = cli.one_line(exc)
        _agree_on_error(problem)
        self.out_dir = Path(t.output_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.step = 0
        self.skipped_steps = 0
        self.bad_in_row = 0
        self.stop_signal = 0
        self._saved_step = None  # step of the checkpoint on disk, if this process saved/loaded it
        self.watchdog: Optional[HangWatchdog] = None
        self.is_logger = dist.get_rank() == 0
        self.writer = None
        self.flops_per_image = train_flops_per_image(cfg.model)
        self.peak_tflops = device_peak_tflops()

    # ------------------------------------------------------------------ data

    def _fetch_images(self, loader) -> Optional[torch.Tensor]:
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
        return [{"images": self._fetch_images(loader),
                 "prefix_len": data.microbatch_prefix_lengths(self.cfg, self.dp_rank, self.dp_size, mbs,
                                                              step * self.n_micro + i)}
                for i in range(self.n_micro)]

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        parallel.finish_param_sync(self.cfg, self.model)
        state = {"step": self.step, "skipped_steps": self.skipped_steps}
        data_state = self.train_loader.state_dict() if self.train_loader is not None else None
        path = checkpoint.save(self.ckpt_root, self.step, self.cfg, self.model, self.optimizer,
                               self.scheduler, state, data_state, keep_last=self.cfg.train.keep_last)
        self._saved_step = self.step
        self._log_line(f"saved checkpoint {path}")
        return path

    def resume(self, which: str = "auto") -> bool:
        if which == "none":
            return False
        path = checkpoint.resolve(self.ckpt_root, "latest" if which == "auto" else which)
        if path is None:
            return False
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
        _agree_on_error(problem, checkpoint.CheckpointError)
        self._saved_step = self.step
        self._log_line(f"resumed from {path} at step {self.step}")
        return True

    # ------------------------------------------------------------------ steps

    def train_step(self) -> dict:
        mbs = self.microbatches(self.step, self.train_loader)
        self.optimizer.zero_grad()
        loss = parallel.forward_backward(self.cfg, self.model, mbs)
        stepped, grad_norm = guarded_optimizer_step(self.optimizer, loss)
        if stepped:
            self.scheduler.step(increment=1)
            self.bad_in_row = 0
        else:
            self.skipped_steps += 1
            self.bad_in_row += 1
            self._log_line(f"step {self.step + 1}: non-finite loss {loss} or grad norm {grad_norm}; "
                           f"step skipped ({self.bad_in_row} in a row)", level=logging.WARNING)
            if self.bad_in_row >= self.cfg.train.max_bad_steps:
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
        if not self.has_val:
            return None
        for chunk in self.model:
            chunk.eval()
        loader = None
        if self.reads_data:
            loader = data.build_loader(self.val_cfg, self.dp_rank, self.dp_size,
                                       self.cfg.train.micro_batch_size, split="val")
        try:
            total = sum(parallel.forward_backward(self.cfg, self.model,
                                                  self.microbatches(i, loader),
                                                  forward_only=True)
                        for i in range(self.cfg.train.eval_iters))
        finally:
            if loader is not None:
                loader.close()
            for chunk in self.model:
                chunk.train()
        return total / self.cfg.train.eval_iters

    # ------------------------------------------------------------------ loop

    def _stop_requested(self) -> bool:
        if not self.stop_signal:
            self.stop_signal = _stop_signal
            # The sbatch scripts create AIM_STOP_FILE on the batch shell's time-limit signal:
            # a signal to the job step would kill torchrun, which does not handle SIGUSR1.
            stop_file = os.environ.get("AIM_STOP_FILE")
            if not self.stop_signal and stop_file and os.path.exists(stop_file):
                self.stop_signal = int(signal.SIGUSR1)
        flag = torch.tensor([self.stop_signal], dtype=torch.int32, device=cpu_shims.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # any rank signalled -> all stop together
        return bool(flag.item())

    def _checkpoint_for_requeue(self) -> int:
        """Save (unless the latest checkpoint is this step's), then leave the marker the sbatch
        scripts requeue on: torchrun's and srun's exit codes after a signal say nothing."""
        self._log_line(f"signal {self.stop_signal or 'from a peer'} received: checkpointing "
                       f"at step {self.step} and exiting for requeue")
        # Step 0 of a fresh run has nothing to keep, and its optimizer has no state yet: a checkpoint
        # of it would not load (found on the real cluster); the requeued job simply starts again.
        if self._saved_step != self.step and self.step > 0:
            self.save()
        stop_file = os.environ.get("AIM_STOP_FILE")
        if stop_file:
            Path(stop_file).unlink(missing_ok=True)
        if self.is_logger:
            marker = self._requeue_marker()
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"step": self.step, "signal": self.stop_signal,
                                          "time": time.time()}) + "\n")
        # No rank exits before the marker exists: srun --kill-on-bad-exit kills the other tasks
        # as soon as one exits 3, and rank 0 killed before writing it would leave a job that
        # checkpointed but is not requeued.
        dist.barrier()
        return EXIT_REQUEUE

    def _requeue_marker(self) -> Path:
        return Path(os.environ.get("AIM_REQUEUE_MARKER") or self.out_dir / "requeue.json")

    def run(self) -> int:
        t = self.cfg.train
        signal_proof_checkpoint_writer()
        self._open_logs()
        if self._stop_requested():  # signalled during start-up or resume
            return self._checkpoint_for_requeue()
        # After the ranks' first meeting: start-up (imports, build, resume) takes each rank its own
        # time (rank 0 also measures a matmul for the summary), and a timeout sized for steps
        # would fire on a rank that waits there for a slower peer (seen with 8 s under load).
        self._start_watchdog()
        progress = self._progress()
        window: list[dict] = []
        window_start = time.perf_counter()
        first_step = self.step
        while self.step < t.train_iters:
            _test_only_block(self.step)
            window.append(self.train_step())
            if self.watchdog is not None:
                self.watchdog.beat(self.step)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{window[-1]['loss']:.4f}", lr=f"{window[-1]['lr']:.2e}")
            if self.step % t.log_interval == 0 or self.step == t.train_iters:
                self._log_window(window, time.perf_counter() - window_start)
                window, window_start = [], time.perf_counter()
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.train_iters:
                self._log_eval(self.evaluate())
            if self._stop_requested():
                return self._checkpoint_for_requeue()
            if t.exit_after_steps and self.step - first_step >= t.exit_after_steps \
                    and self.step < t.train_iters:
                self._log_line(f"train.exit_after_steps reached at step {self.step}: checkpointing")
                self.save()
                return EXIT_OK
            if t.save_interval and self.step % t.save_interval == 0 and self.step < t.train_iters:
                self.save()
        if progress is not None:
            progress.close()
        self._log_eval(self.evaluate())
        self.save()
        self._log_complete()
        return EXIT_OK

    # ------------------------------------------------------------------ logging

    def _open_logs(self) -> None:
        if not self.is_logger:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        self.metrics = open(self.out_dir / "metrics.jsonl", "a")
        if self.cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))

    def _progress(self):
        if not self.is_logger:
            return None
        from tqdm import tqdm
        return tqdm(total=self.cfg.train.train_iters, initial=self.step, desc="pretrain",
                    unit="step", dynamic_ncols=True, file=sys.stderr,
                    disable=None)  # a bar on terminals; log lines only in batch logs

    def _log_line(self, text: str, level: int = logging.INFO) -> None:
        if self.is_logger:
            log.log(level, text)

    def _write_metrics(self, record: dict, scalars: bool = True) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.writer is not None and scalars:
            for key, value in record.items():
                if key not in ("step", "images_seen") and value is not None:
                    self.writer.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss",
                                           value, record["step"])
            self.writer.flush()

    def _log_window(self, window: list[dict], seconds: float) -> None:
        if not self.is_logger or not window:
            return
        good = [w for w in window if math.isfinite(w["loss"])]
        images_per_s = len(window) * self.cfg.train.global_batch_size / max(seconds, 1e-9)
        tflops = images_per_s * self.flops_per_image / self.world / 1e12  # per device
        record = {
            "step": self.step,
            "images_seen": self.step * self.cfg.train.global_batch_size,
            "loss": sum(w["loss"] for w in good) / len(good) if good else float("nan"),
            "lr": window[-1]["lr"],
            "grad_norm": window[-1]["grad_norm"],
            "images_per_s": images_per_s,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "skipped_steps": self.skipped_steps,
            "memory_gb": (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
                          else _rss_gb()),
        }
        self._write_metrics(record)
        mfu = f" mfu {record['mfu']:.1%}" if record["mfu"] else ""
        log.info("step %d/%d loss %.4f lr %.2e grad %.3f | %.1f img/s %.3f TFLOP/s/dev%s | %.2f GB",
                 self.step, self.cfg.train.train_iters, record["loss"], record["lr"],
                 record["grad_norm"], images_per_s, tflops, mfu, record["memory_gb"])

    def _log_eval(self, val_loss: Optional[float]) -> None:
        if self.is_logger and val_loss is not None:
            self._write_metrics({"step": self.step, "val_loss": val_loss})
            log.info("step %d validation loss %.4f", self.step, val_loss)

    def _log_complete(self) -> None:
        """The last record of a finished run (after its final evaluation and checkpoint), so sweeps
        and schedulers need not infer completion from step counts."""
        if self.is_logger:
            self._write_metrics({"step": self.step, "event": "complete",
                                 "images_seen": self.step * self.cfg.train.global_batch_size,
                                 "skipped_steps": self.skipped_steps}, scalars=False)

    def _start_watchdog(self) -> None:
        # train.hang_timeout_s, else AIM_HANG_TIMEOUT_S (set cluster-wide by a job script); 0: off.
        # It must exceed the longest step, evaluation and checkpoint write.
        timeout = self.cfg.train.hang_timeout_s or float(os.environ.get("AIM_HANG_TIMEOUT_S") or 0)
        if timeout > 0:
            self.watchdog = HangWatchdog(self.out_dir / "heartbeat", dist.get_rank(),
                                         dist.get_world_size(), timeout,
                                         marker=self._requeue_marker())
            self.watchdog.beat(self.step)   # the resume step
            self.watchdog.start()

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.train_loader is not None and hasattr(self.train_loader, "close"):
            self.train_loader.close()
        if self.is_logger:
            if getattr(self, "metrics", None):
                self.metrics.close()
            if self.writer is not None:
                self.writer.close()


def _rss_gb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**30


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.2g} s"


# Fraction of a plain matmul's FLOP/s that whole training steps reach: ~0.3 measured on CPU
# (README, benchmarks/mfu.py), below the 45% MFU goal on H100s, so the estimate errs long.
STEP_EFFICIENCY = 0.3
# A step estimated longer than this is reported as absurd for the device.
ABSURD_STEP_SECONDS = 600.0


def measured_matmul_flops(seconds: float = 0.1, params_dtype: str = "fp32") -> tuple[float, str]:
    """FLOP/s of a square matmul on this process's device, measured for about ``seconds``: bf16 on
    a GPU (its training precision), the run's train.params_dtype on a CPU (bf16 is ~2x fp32 there)."""
    device = cpu_shims.device()
    cuda = device.type == "cuda"
    n = 4096 if cuda else 256
    dtype = torch.bfloat16 if cuda or params_dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 4 == 0:
            sync()
            if time.perf_counter() - start >= seconds:
                break
    rate = 2.0 * n ** 3 * reps / (time.perf_counter() - start)
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    return rate, f"{name}: {dtype_name(dtype)} matmul {rate / 1e12:.3g} TFLOP/s"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def startup_summary(cfg: Config, world: int, matmul_flops: Optional[tuple[float, str]] = None
                    ) -> tuple[list[str], Optional[str]]:
    """What is about to run, before anything is built: (lines, warning or None). The warning
    is set when the estimated step time or memory is absurd for the device."""
    from aim_megatron.scaling.sizing import GIB, estimate_memory, head_params, trunk_params
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dp = p.data_parallel_size(world)
    rate, device = matmul_flops or measured_matmul_flops(params_dtype=t.params_dtype)
    step_flops = train_flops_per_image(m) * t.global_batch_size
    step_s = step_flops / (world * rate * STEP_EFFICIENCY)
    lines = [
        f"model {m.preset or 'custom'}: {trunk_params(m) / 1e6:,.1f}M trunk + {head_params(m) / 1e6:,.1f}M "
        f"head parameters ({m.num_layers} layers, width {m.hidden_size}, {m.num_heads} heads), "
        f"{m.image_size}px images in {m.num_patches} patches",
        f"{t.global_batch_size} images per step = micro-batch {t.micro_batch_size} x "
        f"{num_microbatches(cfg, world)} micro-batches x dp {dp}; layout tp={p.tp} pp={p.pp} "
        f"vp={p.vp or 1} dp={dp} on {world} process(es); {t.train_iters} steps in {t.params_dtype}",
        f"{step_flops / 1e12:,.3g} TFLOP per step; estimated {_duration(step_s)} per step and "
        f"{_duration(step_s * t.train_iters)} for the run ({device}; {STEP_EFFICIENCY:.0%} of it assumed)",
    ]
    problems = []
    if step_s > ABSURD_STEP_SECONDS:
        problems.append(f"about {_duration(step_s)} per step")
    memory = estimate_memory(cfg, world).peak.total
    if torch.cuda.is_available():
        available = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        where = "of GPU memory"
    else:  # every process of this machine shares its memory
        import psutil
        available = psutil.virtual_memory().total / int(os.environ.get("LOCAL_WORLD_SIZE", world))
        where = "of this machine's memory per process"
    if memory > available:
        problems.append(f"an estimated {memory / GIB:.1f} GiB per process, more than the "
                        f"{available / GIB:.1f} GiB {where}")
    warning = None
    if problems:
        warning = (f"this run is far too big for this device ({' and '.join(problems)}); use a smaller "
                   f"model (e.g. model.preset=aim-tiny, see examples/configs/), a smaller "
                   f"train.global_batch_size, or more/faster devices")
    return lines, warning


def preflight(cfg: Config) -> None:
    """What a config needs from this machine, checked alike on every rank before any process
    group or model exists: the output directory, the data loader, every data source's path."""
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir={out} is a file; name a directory")
    try:
        kind = data.select_loader_kind(cfg.data.loader)
    except ImportError as exc:
        raise ConfigError(cli.one_line(exc)) from None
    if kind == "dali" and cfg.data.dali_device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("data.dali_device=gpu but CUDA is not available; use data.dali_device=auto or cpu")
    data.check_source_paths(cfg)


def parse_args(argv=None) -> argparse.Namespace:
    ap = cli.ArgumentParser(prog="aim-pretrain", description="Pre-train AIM with megatron-core.")
    ap.add_argument("--config", help="YAML config (see examples/configs/)")
    ap.add_argument("--resume", default="auto",
                    help="'auto' (latest checkpoint in train.output_dir, if any), 'none', or a step_* dir")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. parallel.tp=2")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    previous_handlers = install_signal_handlers()  # first: a signal at start-up is not lost
    _die_with_torchrun()
    try:
        return _main(argv)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


def _main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its per-parameter INFO lists
    # Errors every rank finds alike (config, data paths) are printed by rank 0 only: one line,
    # not one per process.
    def fail(kind: str, exc: BaseException) -> int:
        if cli.is_rank0():
            print(f"aim-pretrain: {kind}{cli.one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR

    try:
        cfg = load_config(args.config, args.overrides)
        resolve_params_dtype(cfg)   # "auto": this machine's fast dtype, recorded in checkpoints
        cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))  # before any process group exists
        preflight(cfg)
        world = parallel.initialize(cfg)
    except ConfigError as exc:
        parallel.shutdown()
        return fail("configuration error: ", exc)
    except data.DataSourceError as exc:
        return fail("data error: ", exc)
    trainer = None
    try:
        if dist.get_rank() == 0:  # say what is about to run before the (maybe long) build
            lines, warning = startup_summary(cfg, world)
            for line in lines:
                log.info(line)
            if warning:
                log.warning(warning)
        trainer = Trainer(cfg, world)
        trainer.resume(args.resume)
        return trainer.run()
    except DataError as exc:
        return fail("data error: ", exc)
    except checkpoint.CheckpointError as exc:
        return fail("checkpoint error: ", exc)
    except TrainingDiverged as exc:
        print(f"aim-pretrain: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    finally:
        if trainer is not None:
            trainer.close()
        parallel.shutdown()


if __name__ == "__main__":
    sys.exit(main())
