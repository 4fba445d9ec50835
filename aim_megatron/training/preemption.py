"""Preemption: stop requests and what a run leaves for its requeue.

Owns the stop-signal recording (SIGTERM/SIGUSR1 set a flag the loop acts on between steps), tying
workers and helper processes to their parents' lives, the signal-proof megatron checkpoint writer,
and ``StopRequests``: whether any rank was asked to stop, and the checkpoint and requeue marker that
follow. Light on purpose: ``python -m aim_megatron.train`` imports it before the seconds of torch
imports, so torch and megatron are imported only inside the functions that use them.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from aim_megatron.training.exit_codes import EXIT_ERROR, EXIT_REQUEUE

log = logging.getLogger("aim_megatron.train")

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
        _stop_signal = 0  # keep one recorded since an earlier install (python -m aim_megatron.train)
    return {sig: signal.signal(sig, _record_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies, however the parent ends (os._exit, SIGKILL)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def ignore_stop_signals() -> None:
    """For helper processes: the trainer decides when to stop, and they die with it."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent()  # ...and die with the trainer: nothing left behind


def die_with_launcher() -> None:
    """A worker dies with the process that launched it: torchrun, or the slurmstepd of an srun task.
    torchrun starts each worker in a session of its own, so a kill -9 of torchrun's process group
    (by a user, or a scheduler without cgroups) left the workers training on, orphaned; an srun
    task whose slurmstepd is gone (a node lost, a step killed) is no longer tracked by Slurm and
    kept its rendezvous port bound into the next job with the same port. A worker whose launcher
    is already gone exits."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "SLURM_STEP_ID" not in os.environ:
        return
    die_with_parent()
    if os.getppid() == 1:  # the launcher died before the prctl above took effect
        os._exit(EXIT_ERROR)


# The Managers started by signal_proof_checkpoint_writer (kept alive for the process's life).
checkpoint_writer_managers: list = []


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
    manager.start(initializer=ignore_stop_signals)
    checkpoint_writer_managers.append(manager)
    filesystem_async._results_queue = manager.Queue()


class StopRequests:
    """Whether this run must stop for a requeue (a signal to any rank, or the stop file), and the
    checkpoint and marker it leaves. Both methods are collectives: every rank calls them."""

    def __init__(self, out_dir: Path, is_logger: bool):
        self.out_dir, self.is_logger = out_dir, is_logger
        self.signal = 0   # this rank's own request (0 while only a peer asked)

    def marker(self) -> Path:
        return Path(os.environ.get("AIM_REQUEUE_MARKER") or self.out_dir / "requeue.json")

    def requested(self) -> bool:
        import torch
        import torch.distributed as dist
        from aim_megatron.distributed import cpu_shims
        if not self.signal:
            self.signal = _stop_signal
            # The sbatch scripts create AIM_STOP_FILE on the batch shell's time-limit signal:
            # a signal to the job step would kill torchrun, which does not handle SIGUSR1.
            stop_file = os.environ.get("AIM_STOP_FILE")
            if not self.signal and stop_file and os.path.exists(stop_file):
                self.signal = int(signal.SIGUSR1)
        flag = torch.tensor([self.signal], dtype=torch.int32, device=cpu_shims.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # any rank signalled -> all stop together
        return bool(flag.item())

    def checkpoint_for_requeue(self, step: int, saved_step: Optional[int],
                               save: Callable[[], object]) -> int:
        """Save (unless the latest checkpoint is this step's), then leave the marker the sbatch
        scripts requeue on: torchrun's and srun's exit codes after a signal say nothing."""
        import torch.distributed as dist
        if self.is_logger:
            log.info(f"signal {self.signal or 'from a peer'} received: checkpointing "
                     f"at step {step} and exiting for requeue")
        # Step 0 of a fresh run has nothing to keep, and its optimizer has no state yet: a checkpoint
        # of it would not load (found on the real cluster); the requeued job simply starts again.
        if saved_step != step and step > 0:
            save()
        stop_file = os.environ.get("AIM_STOP_FILE")
        if stop_file:
            Path(stop_file).unlink(missing_ok=True)
        if self.is_logger:
            marker = self.marker()
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"step": step, "signal": self.signal,
                                          "time": time.time()}) + "\n")
        # No rank exits before the marker exists: srun --kill-on-bad-exit kills the other tasks
        # as soon as one exits 3, and rank 0 killed before writing it would leave a job that
        # checkpointed but is not requeued.
        dist.barrier()
        return EXIT_REQUEUE
