"""Restarts after failures no one announced: a rank killed (SIGKILL, SIGSEGV, the OOM killer) or
raising, a node lost, a hang. Whether the job starts its step again inside the allocation
(``relaunch``), asks Slurm for a new one (``requeue``), ends (``done``) or gives up (``stop``), how
often, and the record of each restart. The sbatch scripts (examples/slurm/lib.sh) ask after every
job step and at every start of the batch script; the rules live here so tests need no Slurm.

    python -m aim_megatron.training.restarts begin  --state-dir D --job J --incarnation N CONFIG_ARGS
    python -m aim_megatron.training.restarts decide --state-dir D --job J --incarnation N \\
        --exit-code RC [--nodes K --gpus-per-node G] CONFIG_ARGS
    python -m aim_megatron.training.restarts train ARGS      aim-pretrain ARGS; records its exit
    python -m aim_megatron.training.restarts torchrun ARGS   torchrun ARGS; records killed workers

CONFIG_ARGS are the trainer's ``--config CFG [section.key=value ...]``: the run's output directory
(metrics.jsonl, checkpoints/latest) and ``train.max_restarts`` come from them. ``begin`` and
``decide`` print the decision word on the first line and one log line on the second.

Rules: exit 0 is ``done``. A rank that exited 1 (bad input) or 2 (diverged) means ``stop``: a
restart would fail the same way. The requeue marker or exit 3 (a signal's checkpoint, or the hang
watchdog) means ``requeue``, as before. Anything else is a crash: ``relaunch`` in the same
allocation (no queue wait), on the nodes still up if the layout divides there, else ``requeue``.
A hang and a crash count against ``train.max_restarts`` per Slurm job; announced stops
(preemption, time limit) do not. Three failures in a row at the same logged step ``stop``.

Why the two wrappers: Python exits 1 on an uncaught exception, the code aim-pretrain keeps for
bad input, and torchrun exits 1 whatever its worker died of. ``train`` runs aim-pretrain in the
same process and exits ``EXIT_CRASH`` on an unexpected exception; both leave one record per rank
(``exit_rank<R>.json``) saying how it ended, so the decision reads causes, not launcher codes.

State in ``--state-dir`` (lib.sh: ``$AIM_OUTPUT_DIR/restarts``): ``history.json`` (every decision
with its cause, steps lost and time to resume), the rank records, and ``first_step.json`` (when
a trainer logged its first step, for the time to resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from aim_megatron.training.exit_codes import EXIT_DIVERGED, EXIT_ERROR, EXIT_OK, EXIT_REQUEUE

EXIT_CRASH = 4            # the train wrapper: an unexpected exception (restartable)
SAME_STEP_FAILURES = 3    # failures in a row at one logged step that end the job
HISTORY_FILE = "history.json"
FIRST_STEP_FILE = "first_step.json"
NEVER_RESTART = (EXIT_ERROR, EXIT_DIVERGED)


# --------------------------------------------------------------------------- what the run left

def last_logged_step(run_dir: Path) -> int:
    """The highest step of metrics.jsonl (0 if none)."""
    last = 0
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in lines:
        try:
            last = max(last, int(json.loads(line).get("step", 0)))
        except (ValueError, AttributeError):
            continue   # a line cut by the crash
    return last


def checkpoint_step(run_dir: Path) -> int:
    """The step of checkpoints/latest, where a restart resumes (0 if none)."""
    try:
        name = (Path(run_dir) / "checkpoints" / "latest").read_text().strip()
        return int(name.rsplit("_", 1)[-1])
    except (FileNotFoundError, ValueError):
        return 0


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_code(code: int) -> str:
    """A launcher's or rank's exit code in words: 137 -> 'exit 137 (SIGKILL)', -11 -> 'SIGSEGV'."""
    if code < 0:
        return _signal_name(-code)
    if code > 128:
        return f"exit {code} ({_signal_name(code - 128)})"
    return f"exit {code}"


def read_rank_records(state_dir: Path) -> dict[int, dict]:
    records = {}
    for path in sorted(Path(state_dir).glob("exit_rank*.json")):
        try:
            record = json.loads(path.read_text())
            records[int(record["rank"])] = record
        except (ValueError, KeyError):
            continue
    return records


def clear_rank_records(state_dir: Path) -> None:
    for path in Path(state_dir).glob("exit_rank*.json"):
        path.unlink(missing_ok=True)
    (Path(state_dir) / FIRST_STEP_FILE).unlink(missing_ok=True)


def write_rank_record(state_dir: Path, rank: int, code: int, detail: str = "") -> None:
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "code": code, "detail": detail, "time": time.time(),
              "node": os.environ.get("SLURMD_NODENAME") or os.uname().nodename}
    tmp = state_dir / f".exit_rank{rank}.json.tmp"
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, state_dir / f"exit_rank{rank}.json")


def load_history(state_dir: Path) -> list[dict]:
    try:
        return json.loads((Path(state_dir) / HISTORY_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return []


def save_history(state_dir: Path, history: list[dict]) -> None:
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{HISTORY_FILE}.tmp"
    tmp.write_text(json.dumps(history, indent=1) + "\n")
    os.replace(tmp, state_dir / HISTORY_FILE)


# --------------------------------------------------------------------------- the decision

@dataclasses.dataclass
class Situation:
    """What a decision looks at; every field comes from files or the command line."""
    job: str
    incarnation: int                  # SLURM_RESTART_COUNT
    max_restarts: int                 # train.max_restarts
    exit_code: Optional[int] = None   # the step's (None: a batch script's start)
    ranks: dict = dataclasses.field(default_factory=dict)   # rank -> its exit record
    marker: Optional[dict] = None     # the requeue marker's content, if any
    last_step: int = 0                # metrics.jsonl
    resume_step: int = 0              # checkpoints/latest
    last_progress: Optional[float] = None   # metrics.jsonl's mtime: when the last step was logged
    fits_on_fewer_nodes: Optional[bool] = None   # nodes were lost; None: none lost
    nodes_lost: str = ""
    world: int = 0                    # ranks the step ran (0: unknown)
    first_step: Optional[dict] = None  # first_step.json of the run that just ended


@dataclasses.dataclass
class Decision:
    word: str        # done | stop | requeue | relaunch (decide); go | stop (begin)
    message: str


def _cause(s: Situation) -> str:
    """Who failed and how: the ranks' records, else the launcher's code."""
    # The first failure first: a rank killed by a signal, a rank that left no record (killed, or
    # its node gone), then the ranks that raised in the order they did (the first one raised
    # itself; its peers usually only lost their connection to it).
    parts = [f"rank {rank} on {rec.get('node', '?')} killed by {describe_code(rec['code'])}"
             for rank, rec in sorted(s.ranks.items()) if rec["code"] < 0]
    silent = [r for r in range(s.world) if r not in s.ranks]
    if silent and len(silent) < s.world:
        parts.append(f"rank(s) {silent} left no record (killed: the step ended with "
                     f"{describe_code(s.exit_code or 0)}; or their node was lost)")
    raised = sorted((rec.get("time", 0), rank, rec) for rank, rec in s.ranks.items()
                    if rec["code"] == EXIT_CRASH)
    parts += [f"rank {rank} on {rec.get('node', '?')} raised: {rec.get('detail', '')}"
              for _, rank, rec in raised]
    if not parts and s.exit_code is not None:
        parts.append(f"step {describe_code(s.exit_code)}, no rank recorded an error "
                     f"(a rank killed, its node lost, or the launch failed)")
    if s.nodes_lost:
        parts.append(f"node(s) lost: {s.nodes_lost}")
    return "; ".join(parts)


def _fill_time_to_resume(history: list[dict], first_step: Optional[dict]) -> None:
    """The previous restart's time to resume: from its last logged step before the failure to
    the first step the restarted trainer logged."""
    if not history or not first_step:
        return
    # Every restart since the last one that resumed: a hang's requeued run can itself be stopped
    # (and requeued, uncounted) before its first step; the hang resumed at this first step too.
    for event in reversed(history):
        if event.get("resumed_after_s") is not None or first_step.get("time", 0) <= event["time"]:
            break
        event["resumed_after_s"] = round(first_step["time"] - event["failed_at"], 1)


def _failures_in_a_row_at(history: list[dict], job: str, step: int) -> int:
    count = 0
    for event in reversed(history):
        if event["job"] != job or not event["counted"]:
            if event["job"] == job and event["decision"] == "requeue":
                continue   # an announced stop between failures does not break the row
            break
        if event["last_step"] != step:
            break
        count += 1
    return count


def _failure(s: Situation, history: list[dict], kind: str, cause: str, then: str) -> Decision:
    """A counted failure: restart with ``then`` unless the budget is spent or it loops."""
    now = time.time()
    lost = max(0, s.last_step - s.resume_step)
    spent = sum(1 for e in history if e["job"] == s.job and e["counted"] and e["decision"] != "stop")
    in_a_row = _failures_in_a_row_at(history, s.job, s.last_step) + 1
    word = then
    if spent >= s.max_restarts:
        word = "stop"
        why = (f"restart budget spent: {spent} restart(s) of job {s.job} already "
               f"(train.max_restarts={s.max_restarts}); not restarting after this {kind}")
    elif in_a_row >= SAME_STEP_FAILURES:
        word = "stop"
        why = (f"the run failed {in_a_row} times in a row at step {s.last_step}; a restart would "
               f"fail there again, so it stops: look at the log around step {s.last_step}")
    else:
        why = (f"restart {spent + 1}/{s.max_restarts} ({'in this allocation' if then == 'relaunch' else 'requeue'})"
               f" after a {kind} at step {s.last_step}: resuming from step {s.resume_step}, "
               f"{lost} step(s) lost")
    history.append({"job": s.job, "incarnation": s.incarnation, "time": now,
                    "failed_at": s.last_progress or now, "decision": word, "kind": kind,
                    "cause": cause, "exit_code": s.exit_code, "last_step": s.last_step,
                    "resume_step": s.resume_step, "lost_steps": lost, "counted": True,
                    "resumed_after_s": None})
    return Decision(word, f"aim restarts: {why} ({cause})")


def decide(s: Situation, history: list[dict]) -> Decision:
    """After a job step ended: what the batch script does next. Appends to ``history``."""
    _fill_time_to_resume(history, s.first_step)
    codes = {rank: rec["code"] for rank, rec in s.ranks.items()}
    bad = sorted(r for r, c in codes.items() if c in NEVER_RESTART)
    if s.exit_code == EXIT_OK and not bad:
        restarts = [e for e in history if e["job"] == s.job and e["counted"]]
        lost = sum(e["lost_steps"] for e in restarts)
        return Decision("done", f"aim restarts: finished after {len(restarts)} restart(s) of job "
                                f"{s.job} after failures, {lost} step(s) lost in all")
    if bad:
        code = codes[bad[0]]
        what = "bad input" if code == EXIT_ERROR else "diverged"
        return Decision("stop", f"aim restarts: not restarting: rank(s) {bad} exited {code} ({what}); "
                                f"a restart would end the same way")
    hang = s.marker is not None and s.marker.get("signal") == "hang"
    if hang:
        stuck = s.marker.get("stuck_ranks")
        return _failure(s, history, "hang", f"the hang watchdog fired, stuck rank(s) {stuck}",
                        "requeue")
    if s.marker is not None or s.exit_code == EXIT_REQUEUE or EXIT_REQUEUE in codes.values():
        history.append({"job": s.job, "incarnation": s.incarnation, "time": time.time(),
                        "failed_at": s.last_progress or time.time(), "decision": "requeue",
                        "kind": "signal", "cause": f"checkpointed on {(s.marker or {}).get('signal')}",
                        "exit_code": s.exit_code, "last_step": s.last_step,
                        "resume_step": s.resume_step, "lost_steps": 0, "counted": False,
                        "resumed_after_s": None})
        return Decision("requeue", f"aim restarts: the trainer checkpointed for a requeue "
                                   f"(marker {s.marker}, {describe_code(s.exit_code or 0)})")
    then = "relaunch" if s.fits_on_fewer_nodes in (None, True) else "requeue"
    decision = _failure(s, history, "node loss" if s.nodes_lost else "crash", _cause(s), then)
    if s.nodes_lost and then == "requeue" and decision.word == "requeue":
        decision.message += "; the layout does not divide on the nodes left, so Slurm finds new ones"
    return decision


def begin(s: Situation, history: list[dict]) -> Decision:
    """At a start of the batch script: a Slurm requeue that no decision of this job asked for
    (its node failed with the batch shell, NODE_FAIL) is a failure too, and counts."""
    _fill_time_to_resume(history, s.first_step)
    mine = [e for e in history if e["job"] == s.job]
    expected = bool(mine) and mine[-1]["decision"] == "requeue" and \
        mine[-1]["incarnation"] == s.incarnation - 1
    if s.incarnation == 0 or expected or any(e["incarnation"] >= s.incarnation for e in mine):
        return Decision("go", f"aim restarts: start {s.incarnation} of job {s.job}, resuming "
                              f"from step {s.resume_step}")
    if mine and mine[-1]["counted"] and mine[-1]["decision"] == "relaunch" \
            and mine[-1]["resumed_after_s"] is None:
        # A node failed: the batch script decided to relaunch (its peers' crash came first), then
        # Slurm's NODE_FAIL requeued the job before the relaunch got going. One failure: counted
        # once, as the requeue that happened.
        mine[-1]["counted"] = False
        mine[-1]["superseded_by"] = "requeue by Slurm"
    cause = (f"job requeued by Slurm without a decision of its own (restart {s.incarnation}): "
             f"a node of the job failed (NODE_FAIL) or an administrator requeued it"
             + (f"; node(s) of its last start down now: {s.nodes_lost}" if s.nodes_lost else ""))
    decision = _failure(s, history, "requeue by Slurm", cause, "go")
    return decision


# --------------------------------------------------------------------------- wrappers

def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _watch_first_step(run_dir: Path, state_dir: Path) -> None:
    """Rank 0: when this trainer logs its first step, note the time (for the time to resume)."""
    metrics = run_dir / "metrics.jsonl"
    start_size = metrics.stat().st_size if metrics.exists() else 0

    def poll():
        while True:
            time.sleep(0.5)
            try:
                with metrics.open() as f:
                    f.seek(start_size)
                    new = f.read()
            except FileNotFoundError:
                continue
            for line in new.splitlines():
                try:
                    step = json.loads(line).get("step")
                except ValueError:
                    continue
                if step is not None:
                    (state_dir / FIRST_STEP_FILE).write_text(
                        json.dumps({"time": time.time(), "step": step}) + "\n")
                    return

    threading.Thread(target=poll, name="first-step-watch", daemon=True).start()


def run_trainer(argv: list[str]) -> int:
    """aim-pretrain in this process; an unexpected exception exits EXIT_CRASH, not Python's 1."""
    from aim_megatron.training.preemption import install_signal_handlers
    install_signal_handlers()   # before the seconds of torch imports, as python -m aim_megatron.train
    import traceback

    from aim_megatron.training import main as pretrain
    state_dir = Path(os.environ.get("AIM_RESTART_DIR") or ".")
    rank = _rank()
    if rank == 0 and os.environ.get("AIM_RESTART_DIR"):
        try:
            args = pretrain.parse_args(argv)
            from aim_megatron.config import load_config
            _watch_first_step(Path(load_config(args.config, args.overrides).train.output_dir), state_dir)
        except Exception:   # a bad config is aim-pretrain's to report, in its words
            pass
    try:
        code = pretrain.main(argv)
    except Exception as exc:
        traceback.print_exc()
        if os.environ.get("AIM_RESTART_DIR"):
            # the first line, shortened: the full traceback is in the job's log above
            detail = f"{type(exc).__name__}: {exc}".splitlines()[0]
            write_rank_record(state_dir, rank, EXIT_CRASH, detail[:160])
        return EXIT_CRASH
    if os.environ.get("AIM_RESTART_DIR"):
        write_rank_record(state_dir, rank, int(code))
    return int(code)


def run_torchrun(argv: list[str]) -> int:
    """torchrun, exiting with its first failed worker's code (128 + N when killed by signal N)
    and recording the workers killed by a signal, which leave no record of their own."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    from aim_megatron.training.preemption import die_with_launcher
    die_with_launcher()   # an srun task: gone with its slurmstepd, not left holding the store's port
    try:
        torchrun_main(argv)
    except ChildFailedError as exc:
        state_dir = os.environ.get("AIM_RESTART_DIR")
        for rank, failure in exc.failures.items():
            if failure.exitcode < 0 and state_dir:
                write_rank_record(Path(state_dir), rank, failure.exitcode,
                                  f"pid {failure.pid}")
        _, first = exc.get_first_failure()
        code = first.exitcode
        print(f"torchrun: local worker {first.local_rank} ended with "
              f"{describe_code(code)}", file=sys.stderr)
        return 128 - code if code < 0 else code
    return EXIT_OK


# --------------------------------------------------------------------------- command line

def _situation(args, exit_code: Optional[int]) -> tuple[Situation, Path]:
    from aim_megatron.config import load_config
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.train.output_dir)
    state_dir = Path(args.state_dir)
    metrics = run_dir / "metrics.jsonl"
    marker = None
    marker_path = Path(args.marker) if args.marker else run_dir / "requeue.json"
    if exit_code is not None and marker_path.exists():
        try:
            marker = json.loads(marker_path.read_text())
        except ValueError:
            marker = {"signal": "unreadable marker"}
    fits = None
    if args.nodes_lost:
        fits = args.nodes_left > 0
        if fits:
            try:
                cfg.validate(args.nodes_left * args.gpus_per_node)
            except Exception:
                fits = False
    first = None
    try:
        first = json.loads((state_dir / FIRST_STEP_FILE).read_text())
    except (FileNotFoundError, ValueError):
        pass
    s = Situation(job=args.job, incarnation=args.incarnation, max_restarts=cfg.train.max_restarts,
                  exit_code=exit_code, ranks=read_rank_records(state_dir), marker=marker,
                  last_step=last_logged_step(run_dir), resume_step=checkpoint_step(run_dir),
                  last_progress=metrics.stat().st_mtime if metrics.exists() else None,
                  fits_on_fewer_nodes=fits, nodes_lost=args.nodes_lost, first_step=first,
                  world=args.world)
    return s, state_dir


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return run_trainer(argv[1:])
    if argv[:1] == ["torchrun"]:
        return run_torchrun(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m aim_megatron.training.restarts",
                                 description="Restart decisions of the sbatch scripts.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("begin", "decide"):
        p = sub.add_parser(name)
        p.add_argument("--state-dir", required=True)
        p.add_argument("--job", default=os.environ.get("SLURM_JOB_ID", "local"))
        p.add_argument("--incarnation", type=int, default=int(os.environ.get("SLURM_RESTART_COUNT") or 0))
        p.add_argument("--marker", default=os.environ.get("AIM_REQUEUE_MARKER"))
        p.add_argument("--nodes-lost", default="", help="nodes of the allocation that are down")
        p.add_argument("--nodes-left", type=int, default=0)
        p.add_argument("--gpus-per-node", type=int, default=1)
        p.add_argument("--world", type=int, default=0, help="ranks of the step that ended")
        p.add_argument("--config")
        p.add_argument("overrides", nargs="*")
        if name == "decide":
            p.add_argument("--exit-code", type=int, required=True)
    args = ap.parse_args(argv)
    from aim_megatron.config import ConfigError
    try:
        s, state_dir = _situation(args, args.exit_code if args.command == "decide" else None)
    except (ConfigError, OSError) as exc:
        print(f"stop\naim restarts: cannot read the run's config: {exc}")
        return EXIT_ERROR
    history = load_history(state_dir)
    decision = (decide if args.command == "decide" else begin)(s, history)
    save_history(state_dir, history)
    clear_rank_records(state_dir)
    print(f"{decision.word}\n{decision.message}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
