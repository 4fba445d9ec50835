"""Hang detection: a watchdog thread per rank.

Each rank's training loop calls ``beat(step)`` after every step. Its watchdog thread also writes
``<dir>/rank<K>.json`` (pid, step, last progress, thread alive time) every second; the thread keeps
running while the main thread waits in a collective, so a rank whose file stops changing is stopped
or dead itself, while ranks that merely wait for it keep their files fresh. When a rank has made
no progress for ``timeout_s``, it dumps every thread's stack (faulthandler) to its log, logs one
line naming the stuck rank(s) and exits with the requeue code, so that the job resumes from the
last checkpoint instead of idling its allocation until the time limit. Before exiting it writes
the requeue marker (``AIM_REQUEUE_MARKER``), as the trainer does after a signal's checkpoint, so
the sbatch scripts requeue whatever torchrun or srun return.

Which rank is stuck: one whose heartbeat went silent (SIGSTOPped, dead, or holding the GIL); else,
since every heartbeat also records whether its main thread is inside a collective (a frame of
torch.distributed or megatron's communication code on its stack, read with
``sys._current_frames()``), the ranks that are not in one while others wait in one (a rank looping
or sleeping before an all-reduce); else the ranks furthest behind. A main thread blocked inside a
gloo/NCCL call does not stop this thread: torch's collectives and ``Work.wait`` release the GIL
(tests/test_slurm_watchdog.py checks that the waiting ranks' heartbeats stay fresh).
"""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger("aim_megatron.watchdog")

EXIT_HANG = 3  # the requeue code: the sbatch scripts and the sweep runner resume on it

# A main thread with a frame of one of these files on its stack waits in a collective (or a
# point-to-point transfer) for its peers.
_COMM_FILES = re.compile(r"torch/distributed/|megatron/core/(distributed|pipeline_parallel/p2p_comm"
                         r"|tensor_parallel/mappings)")


def main_thread_place() -> tuple[str, bool]:
    """(innermost frame of the main thread as 'file:line function', whether it is in a collective)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "?", False
    where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"
    in_comm = False
    while frame is not None:
        if _COMM_FILES.search(frame.f_code.co_filename.replace(os.sep, "/")):
            in_comm = True
            break
        frame = frame.f_back
    return where, in_comm


class HangWatchdog:
    def __init__(self, directory: str | Path, rank: int, world: int, timeout_s: float,
                 poll_s: float = 1.0, exit: Callable[[int], None] = os._exit,
                 marker: Optional[str | Path] = None):
        self.dir, self.rank, self.world = Path(directory), rank, world
        self.timeout_s, self.poll_s, self._exit = timeout_s, poll_s, exit
        self.marker = Path(marker) if marker else None
        self.fired = False
        self._last_write = time.time()
        self.step, self.progress_time = 0, time.time()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "HangWatchdog":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._loop, name="hang-watchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self, step: int) -> None:
        self.step, self.progress_time = step, time.time()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _write(self) -> None:
        where, in_comm = main_thread_place()
        record = {"pid": os.getpid(), "step": self.step, "progress": self.progress_time,
                  "alive": time.time(), "where": where, "in_collective": in_comm, "fired": self.fired}
        self._last_write = record["alive"]
        tmp = self.dir / f".rank{self.rank}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.dir / f"rank{self.rank}.json")

    def peers(self) -> dict[int, dict]:
        found = {}
        for k in range(self.world):
            try:
                found[k] = json.loads((self.dir / f"rank{k}.json").read_text())
            except (OSError, ValueError):
                found[k] = None
        return found

    def stuck_ranks(self, now: float) -> list[int]:
        """Ranks whose watchdog thread is silent (stopped or dead process); else the ranks not in a
        collective while others wait in one; else the ranks that are furthest behind in steps."""
        peers = self.peers()
        silent = [k for k, r in peers.items() if self._silent(r, now)]
        if silent:
            return silent
        outside = [k for k, r in peers.items() if not r.get("in_collective", False)]
        if outside and len(outside) < len(peers):
            return outside
        low = min(r["step"] for r in peers.values())
        return [k for k, r in peers.items() if r["step"] == low]

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            now = time.time()
            # This thread itself did not run for a while: the whole process was stopped (SIGSTOP,
            # then a SIGCONT, e.g. the one Slurm sends with its SIGTERM when it ends the step).
            self_stopped = now - self._last_write > max(5 * self.poll_s, 3.0)
            try:
                self._write()
            except OSError:
                pass
            if now - self.progress_time > self.timeout_s:
                self._fire(now, self_stopped)
                return

    def _fire(self, now: float, self_stopped: bool = False) -> None:
        stuck = [self.rank] if self_stopped else self.stuck_ranks(now)
        peers = self.peers()
        places = "; ".join(f"rank {k} at {r.get('where', '?')}" + (" (in a collective)" if
                           r.get("in_collective") else "") for k, r in peers.items() if r)
        print(f"[rank {self.rank}] hang watchdog: no progress for {now - self.progress_time:.0f} s "
              f"after step {self.step}; stack of every thread follows", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        line = (f"hang detected: rank {self.rank} made no progress for {self.timeout_s:g} s after "
                f"step {self.step}; stuck rank(s): {','.join(map(str, stuck))}; exiting {EXIT_HANG} "
                f"to resume from the last checkpoint")
        log.error(line)
        print(line, file=sys.stderr, flush=True)
        print(f"[rank {self.rank}] hang watchdog: main threads: {places}", file=sys.stderr, flush=True)
        self._write_marker(stuck)
        self._await_peers()
        self._exit(EXIT_HANG)

    def _silent(self, record: Optional[dict], now: float) -> bool:
        return record is None or now - record["alive"] > max(5 * self.poll_s, 3.0)

    def _await_peers(self, limit_s: float = 20.0) -> None:
        """Exit only once every live peer has fired too (their timers run within a poll of each
        other): the first rank to exit breaks the collective the others wait in, and a rank whose
        collective fails raises in its main thread before it could write its stacks."""
        self.fired = True
        deadline = time.time() + limit_s
        while time.time() < deadline:
            try:
                self._write()
            except OSError:
                pass
            now = time.time()
            if all(self._silent(r, now) or r.get("fired")
                   for k, r in self.peers().items() if k != self.rank):
                return
            time.sleep(min(self.poll_s, 0.5))

    def _write_marker(self, stuck: list[int]) -> None:
        """The "requeue me" marker the sbatch scripts look for; the first rank to fire writes it
        (lib.sh deletes it before each run)."""
        if self.marker is None or self.marker.exists():
            return
        try:
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.marker.with_name(f".{self.marker.name}.rank{self.rank}")
            tmp.write_text(json.dumps({"step": self.step, "signal": "hang", "stuck_ranks": stuck,
                                       "time": time.time()}) + "\n")
            os.replace(tmp, self.marker)
        except OSError as exc:
            print(f"[rank {self.rank}] hang watchdog: could not write {self.marker}: {exc}",
                  file=sys.stderr, flush=True)


def start_hang_watchdog(hang_timeout_s: float, directory: Path, rank: int, world: int, step: int,
                        marker: Path) -> Optional[HangWatchdog]:
    """A started watchdog for a run at ``step``, or None when hang detection is off:
    ``hang_timeout_s`` (train.hang_timeout_s), else AIM_HANG_TIMEOUT_S (set cluster-wide by a job
    script); 0 is off. It must exceed the longest step, evaluation and checkpoint write."""
    timeout = hang_timeout_s or float(os.environ.get("AIM_HANG_TIMEOUT_S") or 0)
    if timeout <= 0:
        return None
    watchdog = HangWatchdog(directory, rank, world, timeout, marker=marker)
    watchdog.beat(step)   # the resume step
    watchdog.start()
    return watchdog
