"""Hang detection: a watchdog thread per rank.

Each rank's training loop calls ``beat(step)`` after every step. Its watchdog thread also writes
``<dir>/rank<K>.json`` (pid, step, last progress, thread alive time) every second; the thread keeps
running while the main thread waits in a collective, so a rank whose file stops changing is stopped
or dead itself, while ranks that merely wait for it keep their files fresh. When a rank has made
no progress for ``timeout_s``, it dumps every thread's stack (faulthandler) to its log, logs one
line naming the stuck rank(s) and exits with the requeue code, so that the job resumes from the
last checkpoint instead of idling its allocation until the time limit.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger("aim_megatron.watchdog")

EXIT_HANG = 3  # the requeue code: the sbatch scripts and the sweep runner resume on it


class HangWatchdog:
    def __init__(self, directory: str | Path, rank: int, world: int, timeout_s: float,
                 poll_s: float = 1.0, exit: Callable[[int], None] = os._exit):
        self.dir, self.rank, self.world = Path(directory), rank, world
        self.timeout_s, self.poll_s, self._exit = timeout_s, poll_s, exit
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
        record = {"pid": os.getpid(), "step": self.step, "progress": self.progress_time, "alive": time.time()}
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
        """Ranks whose watchdog thread is silent (stopped or dead process); else the ranks that
        are furthest behind in steps."""
        peers = self.peers()
        silent = [k for k, r in peers.items() if r is None or now - r["alive"] > max(5 * self.poll_s, 3.0)]
        if silent:
            return silent
        low = min(r["step"] for r in peers.values())
        return [k for k, r in peers.items() if r["step"] == low]

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            now = time.time()
            try:
                self._write()
            except OSError:
                pass
            if now - self.progress_time > self.timeout_s:
                self._fire(now)
                return

    def _fire(self, now: float) -> None:
        stuck = self.stuck_ranks(now)
        print(f"[rank {self.rank}] hang watchdog: no progress for {now - self.progress_time:.0f} s "
              f"after step {self.step}; stack of every thread follows", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        line = (f"hang detected: rank {self.rank} made no progress for {self.timeout_s:g} s after "
                f"step {self.step}; stuck rank(s): {','.join(map(str, stuck))}; exiting {EXIT_HANG} "
                f"to resume from the last checkpoint")
        log.error(line)
        print(line, file=sys.stderr, flush=True)
        self._exit(EXIT_HANG)
