"""Launching a sweep: run its incomplete runs locally (several at once, resumable, interrupted runs
stop the launch with the trainer's requeue exit code) or write a Slurm job array for them.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from aim_megatron.scaling.collect import run_is_complete
from aim_megatron.scaling.plan import load_manifest

LAUNCH_LOG = "launch.jsonl"  # per run: a line per local launch (wall and CPU seconds, exit code)
PREEMPTED_EXIT_CODE = 3   # trainer contract: checkpointed on SIGTERM/SIGUSR1, requeue-able
REPO_ROOT = Path(__file__).resolve().parents[2]


def trainer_command(config: str | Path, trainer: str = "aim_megatron.train", nproc: int = 1,
                    python: str = sys.executable) -> list[str]:
    """The trainer contract: ``python -m aim_megatron.train --config CFG`` (a module) or a script
    path ending in .py; under torchrun (--standalone) when nproc > 1."""
    target = [trainer] if trainer.endswith(".py") else ["-m", trainer]
    args = ["--config", str(config)]
    if nproc <= 1:
        return [python, *target, *args]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *target, *args]


def _trainer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO_ROOT), env.get("PYTHONPATH")) if x)
    return env


@dataclass
class _Running:
    name: str
    run_dir: Path
    proc: subprocess.Popen
    log: Any
    start: float


def _reap(r: _Running, block: bool) -> Optional[tuple[int, float]]:
    """(exit code, CPU seconds of the trainer and everything it waited for) once it has exited."""
    pid, status, usage = os.wait4(r.proc.pid, 0 if block else os.WNOHANG)
    if pid == 0:
        return None
    rc = os.waitstatus_to_exitcode(status)
    r.proc.returncode = rc          # reaped here (for its rusage), so Popen must not wait again
    r.log.close()
    return rc, usage.ru_utime + usage.ru_stime


def launch_local(sweep_dir: str | Path, trainer: str = "aim_megatron.train", nproc: int = 1,
                 keep_going: bool = False, dry_run: bool = False,
                 echo: Callable[[str], None] = print, jobs: int = 1) -> int:
    """Run every incomplete run, ``jobs`` at a time (in manifest order); returns 0,
    PREEMPTED_EXIT_CODE if a run was interrupted (rerun to resume), or 1 if a run failed. After a
    failure (unless ``keep_going``) or an interruption no new run starts; running ones finish."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    sweep_dir = Path(sweep_dir).resolve()
    manifest = load_manifest(sweep_dir)
    pending = []
    for run in manifest["runs"]:
        if run_is_complete(sweep_dir / run["name"], run["train_iters"]):
            echo(f"[skip] {run['name']}: complete")
        else:
            pending.append(run)
    if dry_run:
        for run in pending:
            cmd = trainer_command(sweep_dir / run["name"] / "config.yaml", trainer, nproc)
            echo(f"[run]  {run['name']}: {shlex.join(cmd)}")
        return 0
    failed, preempted, running = [], [], []
    env = _trainer_env()
    try:
        while pending or running:
            while pending and len(running) < jobs and not preempted and (keep_going or not failed):
                run = pending.pop(0)
                run_dir = sweep_dir / run["name"]
                cmd = trainer_command(run_dir / "config.yaml", trainer, nproc)
                echo(f"[run]  {run['name']}: {shlex.join(cmd)}")
                log = open(run_dir / "train.log", "a")
                # Same working directory as the caller: relative data paths in configs resolve as
                # in a hand-started run; everything the trainer writes goes to train.output_dir.
                # The repo is on PYTHONPATH so `-m aim_megatron.train` imports from anywhere.
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append(_Running(run["name"], run_dir, proc, log, time.time()))
            if not running:
                break
            finished = None
            while finished is None:
                for r in running:
                    done = _reap(r, block=len(running) == 1)
                    if done is not None:
                        finished = (r, *done)
                        break
                else:
                    time.sleep(0.1)
            r, rc, cpu = finished
            running.remove(r)
            wall = time.time() - r.start
            with open(r.run_dir / LAUNCH_LOG, "a") as f:
                f.write(json.dumps({"start": round(r.start, 3), "wall_s": round(wall, 2),
                                    "cpu_s": round(cpu, 2), "exit_code": rc, "jobs": jobs}) + "\n")
            echo(f"[done] {r.name}: exit {rc}, {wall:.0f} s wall, {cpu:.0f} s CPU")
            if rc == PREEMPTED_EXIT_CODE:
                echo(f"[stop] {r.name}: trainer checkpointed and exited {rc}; rerun launch to resume")
                preempted.append(r.name)
            elif rc != 0:
                echo(f"[fail] {r.name}: exit code {rc}; see {r.run_dir / 'train.log'}")
                failed.append(r.name)
    finally:
        for r in running:            # launch itself interrupted: stop the runs it started
            r.proc.terminate()       # SIGTERM: the trainer checkpoints and exits 3
        for r in running:
            _reap(r, block=True)
    if preempted:
        return PREEMPTED_EXIT_CODE
    if failed:
        echo(f"{len(failed)} run(s) failed: {', '.join(failed)}")
        return 1
    return 0


def slurm_array_script(sweep_dir: str | Path, repo: str | Path, nodes: Optional[int] = None,
                       gpus_per_node: Optional[int] = None, time: str = "04:00:00",
                       partition: Optional[str] = None, account: Optional[str] = None,
                       max_parallel: Optional[int] = None, extra: Sequence[str] = (),
                       fit_args: Sequence[str] = ()) -> str:
    """An sbatch job array, one task per run of runs.txt, each delegating to
    examples/slurm/multi_node_torchrun.sbatch (env, preflight, signal forwarding, requeue).
    A task whose run finished runs ``scaling_sweep.py finish`` (lib.sh's AIM_AFTER_SUCCESS):
    collect, and once every run is complete, fit with ``fit_args``; so the last task to finish
    leaves results.json, fit.json and the plots, however often tasks were requeued.
    Nodes and GPUs default to the sweep's world_size (up to 8 GPUs per node); gpus_per_node=0
    means CPU nodes: no GPU request (a CPU partition refuses any) and world_size / nodes CPU
    workers per node."""
    sweep_dir, repo = Path(sweep_dir).resolve(), Path(repo).resolve()
    manifest = load_manifest(sweep_dir)
    world = int(manifest.get("world_size", 1))
    cpu = gpus_per_node == 0
    if cpu:
        nodes = nodes or 1
        workers = max(1, math.ceil(world / nodes))
    else:
        gpus_per_node = gpus_per_node or min(world, 8)
        nodes = nodes or max(1, math.ceil(world / gpus_per_node))
        workers = gpus_per_node
    n = len(manifest["runs"])
    array = f"0-{n - 1}" + (f"%{max_parallel}" if max_parallel else "")
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name=aim-sweep-{manifest['name']}",
             f"#SBATCH --array={array}",
             f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1"]
    lines += [] if cpu else [f"#SBATCH --gpus-per-node={gpus_per_node}"]
    lines += [f"#SBATCH --time={time}",
             "#SBATCH --signal=B:USR1@120",
             "#SBATCH --requeue",
             "#SBATCH --open-mode=append",
             f"#SBATCH --output={sweep_dir}/logs/%A_%a.out"]
    lines += [f"#SBATCH --partition={partition}"] if partition else []
    lines += [f"#SBATCH --account={account}"] if account else []
    lines += [f"#SBATCH {x}" for x in extra]
    lines += ["# Generated by tools/scaling_sweep.py: array task i trains the run on line i+1 of",
              "# runs.txt; a requeued task resumes from <run>/checkpoints/latest.",
              "set -euo pipefail",
              f"runs={shlex.quote(str(sweep_dir / 'runs.txt'))}",
              'run_dir=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$runs")',
              f"export AIM_REPO={shlex.quote(str(repo))}",
              'export AIM_OUTPUT_DIR="$run_dir"',
              f"export AIM_GPUS_PER_NODE={workers}",
              "# shellcheck disable=SC2016  # expanded by the bash that lib.sh runs it in",
              "export AIM_AFTER_SUCCESS=" + shlex.quote(
                  '"${AIM_PYTHON:-python}" tools/scaling_sweep.py finish '
                  + shlex.join([str(sweep_dir), *fit_args])),
              'cd "$AIM_REPO"',
              'exec bash examples/slurm/multi_node_torchrun.sbatch "$run_dir/config.yaml"', ""]
    return "\n".join(lines)
