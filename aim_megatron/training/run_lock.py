"""One writer per run directory: the lock that aim-pretrain takes on train.output_dir.

Owns ``<output_dir>/.writer.lock`` and its heartbeat. Global rank 0 takes the lock before anything
is written into the directory and holds it until the run ends; a second writer is refused with one
line naming the holder. flock is unreliable on shared file systems (NFS, Lustre), so the lock is a
file created exclusively: its record is written to a private temporary file first and then
``link(2)``-ed to the lock's name, which fails when the name exists (atomic on NFS too, unlike
O_EXCL on old NFS clients) and never shows a reader a half-written record.

    .writer.lock              host, pid, pid namespace, Slurm job, start time, token; never rewritten
    .writer.lock.heartbeat    {"token", "time"}: rewritten by the holder (temporary file + rename)
    .writer.lock.gate         held for milliseconds by whoever creates or removes the lock

The heartbeat lives in its own file so that refreshing it never replaces the lock: a rename onto
the lock's name would succeed whoever holds it. A heartbeat whose token is not the lock's (a
former holder's) is ignored.

A lock is stale, and is taken over with a warning, when its holder runs on this host in this pid
namespace and its process is gone, when its heartbeat is older than ``train.lock_timeout_s``, or
when it belongs to this same Slurm job (a requeued or restarted incarnation, possibly on another
node). Every change of the lock's name (creating it, removing a stale one, a release, a holder
recreating a lock removed by hand) happens only while holding the gate file, itself created
exclusively. So a taker that moves a lock aside to check that it is the very lock it judged stale
cannot be overtaken by a creator in that moment, and of many takers of one stale lock exactly one
wins. A gate older than a minute belongs to a process that died inside those few file operations
and is cleared. A holder whose lock was taken over (it was paused past the timeout) learns it at
its next heartbeat and stops at once.
"""
from __future__ import annotations

import json
import logging
import os
import random
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from aim_megatron.training.exit_codes import EXIT_ERROR

log = logging.getLogger("aim_megatron.train")

LOCK_NAME = ".writer.lock"
HEARTBEAT_SUFFIX = ".heartbeat"
GATE_SUFFIX = ".gate"
# The gate is held for the few file operations of one change of the lock; one older than this
# belongs to a process that died during them.
GATE_STALE_S = 60.0
# How long a release waits for the gate before leaving its lock to be judged stale (normally
# the gate is free within milliseconds).
RELEASE_GATE_WAIT_S = 10.0
# Heartbeats per timeout, and the longest interval between two: a lost lock is noticed within
# one interval, so it stays short also under a long timeout.
HEARTBEATS_PER_TIMEOUT = 5
MAX_HEARTBEAT_S = 10.0


class RunLockError(RuntimeError):
    """The run directory cannot be locked for writing; the message says why and what to do."""


class RunDirectoryInUse(RunLockError):
    """Another live run holds the directory's writer lock."""


def slurm_job() -> Optional[str]:
    """This process's Slurm job as the scheduler names it: ``ARRAYJOB_TASK`` for an array task
    (the id a user passes to scancel), else SLURM_JOB_ID; None outside Slurm. A requeued job
    keeps it."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_start(pid: int) -> Optional[str]:
    """The start time of a process in clock ticks since boot (tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in (...) may hold spaces


def _process_gone(pid: int, start: Optional[str]) -> bool:
    """Whether a process of this host and pid namespace has ended (a zombie has, too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's live process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False  # no /proc: alive as far as this host can tell
    return state in ("Z", "X") or (start is not None and _process_start(pid) != start)


def this_process() -> dict:
    """Who writes: the fields of a lock record, without its token and times."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid),
            "pid_namespace": _pid_namespace(), "job": slurm_job()}


def _read_record(path: Path) -> Optional[dict]:
    """A lock or heartbeat record; None when the file does not exist; {} when it is unreadable
    (damaged by hand)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _remove_private(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _link_new(path: Path, record: dict) -> bool:
    """Create ``path`` holding ``record`` if no file has that name: write a private file, then
    link it to the name (atomic and exclusive, also on NFS). False when the name exists."""
    private = path.with_name(f"{path.name}.{record['token']}.{uuid.uuid4().hex[:8]}.new")
    with open(private, "x") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(private, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        # NFS may report a failure for a link that was made (a retried request): the private
        # file's link count says whether it was.
        if os.stat(private).st_nlink == 2:
            return True
        raise
    finally:
        _remove_private(private)


def _remove_if_token(path: Path, token: Optional[str]) -> bool:
    """Remove ``path`` only if its record has ``token``, safe against a file that replaced it
    since it was read: move it aside to a private name, check it there, and put a different one
    back (link: never over a newer file). True when it was removed."""
    aside = path.with_name(f"{path.name}.{uuid.uuid4().hex}.aside")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = _read_record(aside) or {}
    if moved.get("token") == token:
        _remove_private(aside)
        return True
    try:
        os.link(aside, path)
    except FileExistsError:
        pass
    _remove_private(aside)
    return False


class RunLock:
    """The writer lock of one run directory, for the process that writes it (global rank 0).

    ``acquire`` takes it (taking over a stale one with a warning) or raises RunDirectoryInUse;
    a daemon thread then refreshes the heartbeat until ``release``. ``on_lost`` is called from that
    thread when another process took the lock over; by default it ends this process at once."""

    def __init__(self, out_dir: Path, timeout_s: float, identity: Optional[dict] = None,
                 on_lost: Optional[Callable[[dict], None]] = None,
                 heartbeat_s: Optional[float] = None):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.heartbeat_path = self.path.with_name(LOCK_NAME + HEARTBEAT_SUFFIX)
        self.gate_path = self.path.with_name(LOCK_NAME + GATE_SUFFIX)
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s or min(MAX_HEARTBEAT_S, timeout_s / HEARTBEATS_PER_TIMEOUT)
        self.identity = identity if identity is not None else this_process()
        self.on_lost = on_lost or self._exit_on_lost
        self.record: Optional[dict] = None
        self.took_over: Optional[str] = None   # the warning, when a stale lock was taken over
        self._created_dir = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ judging a holder

    def heartbeat_age(self, record: dict) -> float:
        """Seconds since the holder's last sign of life, by this host's clock: its heartbeat if
        the heartbeat is its own, else its start."""
        heartbeat = _read_record(self.heartbeat_path) or {}
        if record.get("token") is not None and heartbeat.get("token") == record.get("token"):
            last = heartbeat.get("time")
        else:
            last = record.get("started")
        if not isinstance(last, (int, float)):
            try:  # a damaged record: the lock file's own age
                last = os.stat(self.path).st_mtime
            except OSError:
                last = time.time()
        return time.time() - last  # negative when the holder's clock is ahead: fresh

    def stale_reason(self, record: dict) -> Optional[str]:
        """Why the lock in ``record`` may be taken over now, or None while its holder may live."""
        me = self.identity
        if record.get("job") and record.get("job") == me.get("job"):
            return f"it belongs to this Slurm job ({me['job']}), restarted"
        if (record.get("host") == me.get("host") and record.get("pid_namespace") == me.get("pid_namespace")
                and isinstance(record.get("pid"), int) and record.get("pid") != me.get("pid")
                and _process_gone(record["pid"], record.get("pid_start"))):
            return f"process {record['pid']} on this host has ended"
        age = self.heartbeat_age(record)
        if age > self.timeout_s:
            return f"its heartbeat is {age:.0f} s old, more than train.lock_timeout_s={self.timeout_s:g}"
        return None

    def describe(self, record: dict) -> str:
        if not record:
            return f"an unreadable lock record (last change {self.heartbeat_age(record):.0f} s ago)"
        job = f"Slurm job {record['job']}" if record.get("job") else "no Slurm job"
        return (f"host {record.get('host')}, pid {record.get('pid')}, {job}, "
                f"heartbeat {max(0.0, self.heartbeat_age(record)):.0f} s ago")

    def _refusal(self, record: dict) -> RunDirectoryInUse:
        job = record.get("job")
        stop = f"scancel {job}" if job else f"stop pid {record.get('pid')} on {record.get('host')}"
        return RunDirectoryInUse(
            f"run directory {self.out_dir} is in use by another writer ({self.describe(record)}); "
            f"wait for it to finish, {stop}, or use another train.output_dir; if you are sure no run "
            f"writes there, remove {self.path} (a holder whose heartbeat stops for "
            f"train.lock_timeout_s={self.timeout_s:g} s is taken over)")

    # ------------------------------------------------------------------ taking and leaving

    def acquire(self) -> "RunLock":
        if not self.out_dir.exists():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._created_dir = True
        token = uuid.uuid4().hex
        self.record = {**self.identity, "token": token, "started": time.time()}
        for _ in range(1000):  # each pass ends in success, refusal or a contender's progress
            gate = self._enter_gate()
            if gate is None:  # another process is creating or removing the lock right now
                time.sleep(0.02 + 0.05 * random.random())
                continue
            try:
                if _link_new(self.path, self.record):
                    break
                holder = _read_record(self.path)
                if holder is None:  # released just before this pass took the gate
                    continue
                reason = self.stale_reason(holder)
                if reason is None:
                    raise self._refusal(holder)
                # Under the gate nobody else creates the lock, so this checks and removes the
                # very lock judged stale, and the name stays free for this process.
                if _remove_if_token(self.path, holder.get("token")) and _link_new(self.path, self.record):
                    self.took_over = (f"took over the writer lock of {self.out_dir} from "
                                      f"{self.describe(holder)}: {reason}")
                    log.warning(self.took_over)
                    break
            finally:
                self._leave_gate(gate)
        else:
            self.record = None
            raise RunLockError(f"could not take the writer lock {self.path}: it kept changing hands; "
                               f"is another run starting on train.output_dir={self.out_dir}?")
        self._beat()
        self._thread = threading.Thread(target=self._heartbeats, daemon=True, name="run-lock-heartbeat")
        self._thread.start()
        return self

    def _enter_gate(self) -> Optional[str]:
        """Create the gate file (exclusively); its token, or None when another process holds it.
        A gate left by a process that died holding it is cleared for the next try."""
        mine = {"token": uuid.uuid4().hex, "time": time.time()}
        if _link_new(self.gate_path, mine):
            return mine["token"]
        other = _read_record(self.gate_path)
        if other is not None and time.time() - (other.get("time") or 0) > GATE_STALE_S:
            _remove_if_token(self.gate_path, other.get("token"))
        return None

    def _leave_gate(self, token: Optional[str]) -> None:
        if token is not None:
            _remove_if_token(self.gate_path, token)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this process's; a directory that
        the lock alone created goes too (a run refused at start leaves nothing)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.record is None:
            return
        token, self.record = self.record["token"], None
        _remove_if_token(self.heartbeat_path, token)
        deadline = time.time() + RELEASE_GATE_WAIT_S
        gate = self._enter_gate()
        while gate is None and time.time() < deadline:
            time.sleep(0.01 + 0.02 * random.random())
            gate = self._enter_gate()
        if gate is not None:  # else the lock stays; its ended process makes it stale
            try:
                _remove_if_token(self.path, token)
            finally:
                self._leave_gate(gate)
        if self._created_dir:
            try:
                self.out_dir.rmdir()  # only when empty
            except OSError:
                pass

    # ------------------------------------------------------------------ heartbeat

    def _beat(self) -> None:
        """Write the heartbeat atomically: a reader sees the previous or the new one, whole."""
        private = self.heartbeat_path.with_name(f"{self.heartbeat_path.name}.{self.record['token']}.tmp")
        private.write_text(json.dumps({"token": self.record["token"], "time": time.time()}) + "\n")
        os.replace(private, self.heartbeat_path)

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            record = self.record
            if record is None:
                return
            try:
                current = _read_record(self.path)
                if current is None:  # removed by hand, or a taker is checking it right now
                    gate = self._enter_gate()
                    if gate is None:
                        continue  # look again at the next beat
                    try:
                        current = _read_record(self.path)
                        if current is None and _link_new(self.path, record):
                            log.warning(f"the writer lock {self.path} was removed while this run "
                                        f"held it; recreated it")
                            current = record
                    finally:
                        self._leave_gate(gate)
                if current is None or current.get("token") != record["token"]:
                    self._stop.set()
                    self.on_lost(current or {})
                    return
                self._beat()
            except OSError as exc:  # a file-system hiccup: the next beat tries again
                log.warning(f"writer lock heartbeat in {self.out_dir} failed: {exc}")

    def _exit_on_lost(self, holder: dict) -> None:
        print(f"aim-pretrain: lost the writer lock of {self.out_dir} to another run "
              f"({self.describe(holder)}): this process was paused or its heartbeat stalled for "
              f"train.lock_timeout_s={self.timeout_s:g} s; stopping at once so that two runs do not "
              f"write one directory", file=sys.stderr, flush=True)
        os._exit(EXIT_ERROR)


def hold_run_directory(out_dir: Path, timeout_s: float) -> Optional[RunLock]:
    """Take the writer lock of a run directory for this distributed run: rank 0 takes it and
    every rank learns the outcome, so that all raise RunLockError together and none writes
    while rank 0 is refused. Returns the lock on rank 0, None elsewhere. A collective."""
    import torch.distributed as dist
    lock, refusal = None, None
    if dist.get_rank() == 0:
        lock = RunLock(out_dir, timeout_s)
        try:
            lock.acquire()
        except RunLockError as exc:
            lock, refusal = None, str(exc)
        except OSError as exc:
            lock, refusal = None, f"cannot create the writer lock in {out_dir}: {exc}"
    if dist.get_world_size() > 1:
        decision = [refusal]
        dist.broadcast_object_list(decision, src=0)
        refusal = decision[0]
    if refusal is not None:
        raise RunLockError(refusal)
    return lock
