"""Scaling-law sweeps for AIM: plan runs from a grid, launch them, collect losses, fit, predict.

Fit (Hoffmann et al. 2022, "Chinchilla", approach 3):

    L(N, D) = E + A / N^alpha + B / D^beta,   N = trunk params, D = images seen

fitted as log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e by
minimising a Huber loss (delta 1e-3) of the log-residuals with L-BFGS, started from the best
points of an initialisation grid. Compute is C = D * flops_per_image(N): "6ND" counts
6 * N * tokens per image, "aim" is the explicit count of flops.py (trunk, prediction head and the
attention pairs the prefix-causal mask allows; sizing.train_flops_per_image). Minimising L under
C = k N D gives the closed form

    N_opt = G (C/k)^(beta/(alpha+beta)),  D_opt = (C/k) / N_opt,  G = (alpha A / (beta B))^(1/(alpha+beta)).

A second, model-free law L(C) = E_c + K C^-gamma is fitted to the compute frontier (the running
minimum of loss over increasing compute).
"""
from __future__ import annotations

import contextlib
import copy
import csv
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import yaml

from aim_megatron.config import Config, ConfigError, ModelConfig, apply_overrides, config_from_dict, validate
from aim_megatron.scaling.sizing import head_train_flops_per_image, train_flops_per_image, trunk_params

MANIFEST = "sweep.json"
RESULTS = "results.json"
FIT = "fit.json"
LAUNCH_LOG = "launch.jsonl"  # per run: a line per local launch (wall and CPU seconds, exit code)
PREEMPTED_EXIT_CODE = 3   # trainer contract: checkpointed on SIGTERM/SIGUSR1, requeue-able
REPO_ROOT = Path(__file__).resolve().parents[2]


# =========================================================================== planning

@dataclass
class RunPlan:
    name: str
    model: dict[str, Any]          # model.* fields that differ between runs
    train_iters: int
    global_batch_size: int
    trunk_params: int              # N
    flops_per_image: float

    @property
    def images(self) -> int:       # D: what the run actually sees (iters x batch)
        return self.train_iters * self.global_batch_size

    @property
    def compute(self) -> float:
        return self.images * self.flops_per_image


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any]                       # raw config sections, overrides applied
    shapes: list[dict[str, Any]]               # model.* fields per model size
    images: list[float] = field(default_factory=list)
    compute: list[float] = field(default_factory=list)
    flops: str = "6ND"
    world_size: int = 1


def _shape_name(shape: dict[str, Any]) -> str:
    keys = {"hidden_size": "w", "num_layers": "d", "num_heads": "h"}
    parts = [f"{keys[k]}{shape[k]}" for k in keys if k in shape]
    parts += [f"{k}{v}" for k, v in sorted(shape.items()) if k not in keys]
    return "-".join(parts) or "base"


def _short(x: float) -> str:
    return f"{x:.3g}".replace("e+0", "e").replace("e+", "e")


def load_sweep(path: str | Path) -> SweepSpec:
    """Read a sweep grid YAML (see examples/sweeps/)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec {path} does not exist; see examples/sweeps/ for examples")
    spec = yaml.safe_load(path.read_text()) or {}
    known = {"name", "base_config", "base", "overrides", "models", "widths", "depths", "head_dim",
             "images", "compute", "flops", "world_size"}
    unknown = set(spec) - known
    if unknown:
        raise ConfigError(f"sweep spec {path}: unknown key(s) {sorted(unknown)}; valid: {sorted(known)}")
    base: dict[str, Any] = {}
    if spec.get("base_config"):
        base_path = (path.parent / spec["base_config"]).resolve()
        if not base_path.is_file():
            raise ConfigError(f"sweep spec {path}: base_config {base_path} does not exist")
        base = yaml.safe_load(base_path.read_text()) or {}
    for section, values in (spec.get("base") or {}).items():
        base.setdefault(section, {}).update(values or {})
    base = apply_overrides(base, [str(o) for o in spec.get("overrides") or []])

    shapes = [dict(s) for s in spec.get("models") or []]
    if spec.get("widths") or spec.get("depths"):
        if not (spec.get("widths") and spec.get("depths") and spec.get("head_dim")):
            raise ConfigError(f"sweep spec {path}: widths and depths need each other and head_dim "
                              f"(num_heads = width / head_dim)")
        for w, d in itertools.product(spec["widths"], spec["depths"]):
            if w % spec["head_dim"]:
                raise ConfigError(f"sweep spec {path}: width {w} is not a multiple of head_dim "
                                  f"{spec['head_dim']}")
            shapes.append({"hidden_size": int(w), "num_layers": int(d),
                           "num_heads": int(w) // int(spec["head_dim"])})
    if not shapes:
        raise ConfigError(f"sweep spec {path}: give 'models' (a list of model.* mappings) or "
                          f"'widths' + 'depths' + 'head_dim'")
    images = [float(x) for x in spec.get("images") or []]
    compute = [float(x) for x in spec.get("compute") or []]
    if bool(images) == bool(compute):
        raise ConfigError(f"sweep spec {path}: give exactly one of 'images' (images seen per run) "
                          f"or 'compute' (FLOPs per run)")
    flops = str(spec.get("flops", "6ND"))
    if flops not in ("6ND", "aim"):
        raise ConfigError(f"sweep spec {path}: flops must be '6ND' or 'aim', got {flops!r}")
    return SweepSpec(name=str(spec.get("name", path.stem)), base=base, shapes=shapes,
                     images=images, compute=compute, flops=flops,
                     world_size=int(spec.get("world_size", 1)))


def _run_config(spec: SweepSpec, shape: dict[str, Any], train_iters: Optional[int] = None) -> Config:
    data = copy.deepcopy(spec.base)
    data.setdefault("model", {}).update(shape)
    if train_iters is not None:
        data.setdefault("train", {})["train_iters"] = train_iters
    cfg = config_from_dict(data)
    validate(cfg, spec.world_size)
    return cfg


def plan_runs(spec: SweepSpec) -> list[RunPlan]:
    """One run per (shape, data size or compute budget); train_iters rounds to whole steps."""
    runs = []
    for shape in spec.shapes:
        try:
            cfg = _run_config(spec, shape)
        except ConfigError as exc:
            raise ConfigError(f"sweep model {shape}: {exc}") from exc
        n, fpi = trunk_params(cfg.model), train_flops_per_image(cfg.model, spec.flops)
        gbs = cfg.train.global_batch_size
        targets = spec.images or [c / fpi for c in spec.compute]
        tags = [f"i{_short(x)}" for x in spec.images] or [f"c{_short(c)}" for c in spec.compute]
        for target, tag in zip(targets, tags):
            iters = max(1, round(target / gbs))
            runs.append(RunPlan(f"{_shape_name(shape)}-{tag}", shape, iters, gbs, n, fpi))
    names = [r.name for r in runs]
    dupes = sorted({x for x in names if names.count(x) > 1})
    if dupes:
        raise ConfigError(f"sweep has duplicate runs {dupes}; remove repeated models or sizes")
    return runs


def write_runs(spec: SweepSpec, runs: list[RunPlan], out_dir: str | Path, force: bool = False) -> Path:
    """A directory per run holding the resolved config.yaml, plus sweep.json and runs.txt."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for run in runs:
        run_dir = out_dir / run.name
        cfg = _run_config(spec, run.model, run.train_iters)
        data = cfg.to_dict()
        data["train"]["output_dir"] = str(run_dir)   # trainer contract: metrics.jsonl goes here
        text = yaml.safe_dump(data, sort_keys=False)
        cfg_path = run_dir / "config.yaml"
        if cfg_path.exists() and cfg_path.read_text() != text and not force:
            raise ConfigError(f"{cfg_path} exists with a different config; use another --out "
                              f"directory or --force to overwrite it")
        run_dir.mkdir(exist_ok=True)
        cfg_path.write_text(text)
        entries.append({**asdict(run), "images": run.images, "compute": run.compute})
    manifest = {"name": spec.name, "flops": spec.flops, "world_size": spec.world_size,
                "tokens_per_image": config_from_dict(copy.deepcopy(spec.base)).model.num_patches,
                "base_model": _run_config(spec, {}).to_dict()["model"], "runs": entries}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (out_dir / "runs.txt").write_text("".join(f"{out_dir / r.name}\n" for r in runs))
    return out_dir / MANIFEST


def load_manifest(sweep_dir: str | Path) -> dict[str, Any]:
    path = Path(sweep_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; create the sweep with "
                                f"'tools/scaling_sweep.py plan SPEC.yaml --out {sweep_dir}'")
    return json.loads(path.read_text())


# =========================================================================== launching

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


def expects_validation(run_dir: str | Path) -> Optional[bool]:
    """Whether the trainer evaluates this run (it does with data.val_sources, and validates a
    synthetic training set on synthetic images); None without a readable config.yaml."""
    try:
        data = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    d = data.get("data") or {}
    train = d.get("train_sources") or ["synthetic"]
    return bool(d.get("val_sources")) or all(x == "synthetic" for x in train)


def is_complete(run_dir: str | Path, records: list[dict], train_iters: int) -> bool:
    """A run is done when the trainer logged its final "complete" record (after the final
    evaluation and checkpoint). Logs without it: trained to the end and, when the run validates,
    evaluated there (the trainer logs the last train step before its final evaluation, so a run
    killed in between is not done yet)."""
    if any(r.get("event") == "complete" and r["step"] >= train_iters for r in records):
        return True
    steps = [r["step"] for r in records if record_kind(r) == "train"]
    vals = [r["step"] for r in records if record_kind(r) == "val"]
    needs_val = expects_validation(run_dir)
    needs_val = bool(vals) if needs_val is None else needs_val
    return bool(steps) and max(steps) >= train_iters and (not needs_val or max(vals, default=0) >= train_iters)


def run_is_complete(run_dir: str | Path, train_iters: int) -> bool:
    records, _ = read_metrics(Path(run_dir) / "metrics.jsonl")
    return is_complete(run_dir, records, train_iters)


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


# =========================================================================== collecting

def _parse_line(line: str) -> Optional[dict]:
    """One metrics record; a line cut by a kill and then continued by a resumed trainer holds the
    start of a lost record followed by a whole one: keep the whole one."""
    starts = [0] + [i for i in range(len(line) - 1, 0, -1) if line.startswith('{"', i)]
    for start in starts:
        try:
            rec = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        return rec if isinstance(rec, dict) and isinstance(rec.get("step"), int) else None
    return None


def read_metrics(path: str | Path) -> tuple[list[dict], int]:
    """(records, unreadable line count). Records are deduplicated per (kind, step), keeping the last
    one, since a resumed trainer re-logs steps after its last checkpoint; sorted by step. Kinds:
    train (has "loss"), val (has "val_loss"), event (has "event", e.g. the final "complete")."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    latest: dict[tuple[str, int], dict] = {}
    bad = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        rec = _parse_line(line)
        if rec is None:
            bad += 1
            continue
        latest[(record_kind(rec), rec["step"])] = rec
    order = {"train": 0, "val": 1, "event": 2}
    return sorted(latest.values(), key=lambda r: (r["step"], order[record_kind(r)])), bad


def record_kind(rec: dict) -> str:
    return "event" if "event" in rec else "val" if "val_loss" in rec else "train"



@dataclass
class RunResult:
    name: str
    trunk_params: int
    images: int                     # planned images (train_iters x global batch)
    flops_per_image: float
    train_iters: int
    last_step: int = 0
    complete: bool = False
    final_val_loss: Optional[float] = None
    final_val_step: Optional[int] = None
    final_train_loss: Optional[float] = None   # mean of the last 5 logged train losses
    curve: list[tuple[int, int, float]] = field(default_factory=list)  # (step, images_seen, val_loss)
    unreadable_lines: int = 0

    @property
    def compute(self) -> float:
        return self.images * self.flops_per_image


def collect_run(run_dir: str | Path, run: dict[str, Any]) -> RunResult:
    records, bad = read_metrics(Path(run_dir) / "metrics.jsonl")
    res = RunResult(run["name"], run["trunk_params"], run["images"], run["flops_per_image"],
                    run["train_iters"], unreadable_lines=bad)
    train = [r for r in records if "loss" in r]
    seen = {r["step"]: int(r["images_seen"]) for r in train if "images_seen" in r}
    for r in records:
        if "val_loss" in r:
            images = seen.get(r["step"], r["step"] * run["global_batch_size"])
            res.curve.append((r["step"], images, float(r["val_loss"])))
    if res.curve:
        res.final_val_step, _, res.final_val_loss = res.curve[-1]
    if train:
        res.last_step = train[-1]["step"]
        res.complete = is_complete(run_dir, records, run["train_iters"])
        tail = [float(r["loss"]) for r in train[-5:]]
        res.final_train_loss = sum(tail) / len(tail)
    return res


def collect(sweep_dir: str | Path) -> list[RunResult]:
    sweep_dir = Path(sweep_dir)
    manifest = load_manifest(sweep_dir)
    return [collect_run(sweep_dir / run["name"], run) for run in manifest["runs"]]


def save_results(results: list[RunResult], sweep_dir: str | Path) -> tuple[Path, Path]:
    sweep_dir = Path(sweep_dir)
    js = sweep_dir / RESULTS
    js.write_text(json.dumps([asdict(r) for r in results], indent=1))
    cs = sweep_dir / "results.csv"
    cols = ["name", "trunk_params", "images", "compute", "train_iters", "last_step", "complete",
            "final_val_step", "final_val_loss", "final_train_loss"]
    with open(cs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            w.writerow([getattr(r, c) for c in cols])
    return js, cs


def fit_points(results: Iterable[RunResult], metric: str = "val_loss", intermediate: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, C, L) of complete runs: their final loss, plus every intermediate val loss (at the
    images seen so far) when ``intermediate``. Intermediate points of a cosine schedule sit above
    the loss a run of that length would reach, so they bias the fit; use them for exploration."""
    rows = []
    for r in results:
        if not r.complete:
            continue
        if metric == "loss":
            if r.final_train_loss is not None:
                rows.append((r.trunk_params, r.images, r.final_train_loss, r.flops_per_image))
            continue
        if r.final_val_loss is None:
            continue
        points = r.curve if intermediate else r.curve[-1:]
        rows += [(r.trunk_params, images, loss, r.flops_per_image) for _, images, loss in points
                 if images > 0]
    if not rows:
        raise ValueError("no complete runs with a loss to fit; run 'collect' and check that runs "
                         "finished and logged val_loss (or use --metric loss)")
    a = np.array(rows, dtype=float)
    return a[:, 0], a[:, 1], a[:, 1] * a[:, 3], a[:, 2]


# =========================================================================== fitting

PARAM_NAMES = ("E", "A", "B", "alpha", "beta")


@dataclass
class LossLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, N, D):
        N, D = np.asarray(N, float), np.asarray(D, float)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def as_array(self) -> np.ndarray:
        return np.array([self.E, self.A, self.B, self.alpha, self.beta])


@dataclass
class ComputeLaw:
    """L(C) = E + K C^-gamma."""
    E: float
    K: float
    gamma: float

    def __call__(self, C):
        return self.E + self.K * np.asarray(C, float) ** -self.gamma


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    return value, np.where(small, r, delta * np.sign(r))


def _lse_objective(theta: np.ndarray, X: np.ndarray, y: np.ndarray, delta: float
                   ) -> tuple[float, np.ndarray]:
    """Mean Huber of LSE(c_j - k_j x_j ..., e) - log L and its gradient.

    theta = (c_1..c_m, e, k_1..k_m) for m log-features X[:, j]; scaled by 1/delta so that
    L-BFGS tolerances do not depend on delta."""
    m = X.shape[1]
    c, e, k = theta[:m], theta[m], theta[m + 1:]
    z = np.concatenate([c[None, :] - X * k[None, :], np.full((len(y), 1), e)], axis=1)
    zmax = z.max(axis=1, keepdims=True)
    w = np.exp(z - zmax)
    s = w.sum(axis=1, keepdims=True)
    lse = (zmax + np.log(s))[:, 0]
    w /= s
    value, dr = _huber(lse - y, delta)
    n = len(y) * delta
    grad = np.concatenate([(dr[:, None] * w[:, :m]).sum(0), [(dr * w[:, m]).sum()],
                           -(dr[:, None] * w[:, :m] * X).sum(0)]) / n
    return float(value.sum() / n), grad


def _grid_objective(thetas: np.ndarray, X: np.ndarray, y: np.ndarray, delta: float) -> np.ndarray:
    """Objective of many theta at once, to rank the initialisation grid."""
    m = X.shape[1]
    c, e, k = thetas[:, :m], thetas[:, m], thetas[:, m + 1:]
    z = c[:, None, :] - X[None, :, :] * k[:, None, :]                  # [G, n, m]
    z = np.concatenate([z, np.broadcast_to(e[:, None, None], z.shape[:2] + (1,))], axis=2)
    lse = np.logaddexp.reduce(z, axis=2)
    return _huber(lse - y[None, :], delta)[0].mean(axis=1)


def _one_blas_thread():
    """L-BFGS-B calls BLAS on 5x5..20x20 matrices; OpenBLAS threads make that 5-10x slower on a
    busy machine. threadpoolctl limits them when installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _fit_lse(X: np.ndarray, y: np.ndarray, grid: np.ndarray, delta: float, n_starts: int,
             extra_starts: Sequence[np.ndarray] = ()) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    starts = list(extra_starts)
    if n_starts > 0:
        order = np.argsort(_grid_objective(grid, X, y, delta))
        starts += [grid[i] for i in order[:n_starts]]
    best, best_value = None, math.inf
    with _one_blas_thread():
        for theta0 in starts:
            res = minimize(_lse_objective, theta0, args=(X, y, delta), jac=True, method="L-BFGS-B",
                           options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-10})
            if res.fun < best_value:
                best, best_value = res.x, float(res.fun)
    return best, best_value


def _grid(*axes: Sequence[float]) -> np.ndarray:
    return np.array(list(itertools.product(*axes)), dtype=float)


# Chinchilla's initialisation grid: a, b in {0, 5, .., 25}, e in {-1, -.5, .., 1},
# alpha, beta in {0, .5, .., 2}.
LOSS_LAW_GRID = _grid(np.arange(0, 26, 5), np.arange(0, 26, 5), np.arange(-1, 1.01, 0.5),
                      np.arange(0, 2.01, 0.5), np.arange(0, 2.01, 0.5))
COMPUTE_LAW_GRID = _grid(np.arange(0, 31, 2.5), np.arange(-2, 1.01, 0.5),
                         [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0])


def _law_from_theta(t: np.ndarray) -> LossLaw:
    # theta order: (a, b, e, alpha, beta)
    return LossLaw(E=math.exp(t[2]), A=math.exp(t[0]), B=math.exp(t[1]), alpha=t[3], beta=t[4])


def _theta_from_law(law: LossLaw) -> np.ndarray:
    # A fit that finds no floor drives e to -inf and E = e^e underflows to 0: start from e = -690.
    def log(x: float) -> float:
        return math.log(max(x, 1e-300))
    return np.array([log(law.A), log(law.B), log(law.E), law.alpha, law.beta])


def fit_loss_law(N, D, L, delta: float = 1e-3, n_starts: int = 8,
                 init: Optional[LossLaw] = None, grid: np.ndarray = LOSS_LAW_GRID) -> LossLaw:
    """Chinchilla approach 3 fit of L(N, D) (Huber on log-loss, L-BFGS from the best grid points)."""
    N, D, L = (np.asarray(v, float) for v in (N, D, L))
    if len(L) < 5:
        raise ValueError(f"fitting 5 parameters needs at least 5 points, got {len(L)}")
    if len(np.unique(N)) < 2 or len(np.unique(D)) < 2:
        raise ValueError("the fit needs at least 2 model sizes and 2 data sizes")
    X = np.stack([np.log(N), np.log(D)], axis=1)
    extra = [_theta_from_law(init)] if init is not None else []
    theta, _ = _fit_lse(X, np.log(L), grid, delta, n_starts, extra)
    return _law_from_theta(theta)


def bootstrap_loss_law(N, D, L, law: LossLaw, n_boot: int = 200, seed: int = 0,
                       delta: float = 1e-3, n_starts: int = 0) -> np.ndarray:
    """[n_boot, 5] parameter samples (E, A, B, alpha, beta) from refits on points resampled with
    replacement, each started from the full-data fit and the best grid points."""
    N, D, L = (np.asarray(v, float) for v in (N, D, L))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(L), len(L))
        if len(np.unique(N[idx])) < 2 or len(np.unique(D[idx])) < 2:
            continue   # a degenerate resample cannot identify both exponents
        samples.append(fit_loss_law(N[idx], D[idx], L[idx], delta, n_starts, init=law).as_array())
    return np.array(samples)


def confidence_intervals(samples: np.ndarray, level: float = 0.95,
                         names: Sequence[str] = PARAM_NAMES) -> dict[str, tuple[float, float]]:
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return {n: (float(a), float(b)) for n, a, b in zip(names, lo, hi)}


def compute_frontier(C, L) -> tuple[np.ndarray, np.ndarray]:
    """Points that beat every point of lower compute (running minimum of loss over compute)."""
    C, L = np.asarray(C, float), np.asarray(L, float)
    order = np.argsort(C, kind="stable")
    keep, best = [], math.inf
    for i in order:
        if L[i] < best:
            keep.append(i)
            best = L[i]
    return C[keep], L[keep]


def fit_compute_law(C, L, delta: float = 1e-3, n_starts: int = 8) -> ComputeLaw:
    C, L = np.asarray(C, float), np.asarray(L, float)
    if len(L) < 3:
        raise ValueError(f"L(C) has 3 parameters and needs at least 3 frontier points, got {len(L)}")
    theta, _ = _fit_lse(np.log(C)[:, None], np.log(L), COMPUTE_LAW_GRID, delta, n_starts)
    return ComputeLaw(E=math.exp(theta[1]), K=math.exp(theta[0]), gamma=float(theta[2]))


# =========================================================================== predicting

def chinchilla_optimum(law: LossLaw, C: float, flops_per_param_image: float) -> tuple[float, float]:
    """Closed-form compute-optimal (N, D) under C = k N D."""
    a, b = law.alpha, law.beta
    G = (a * law.A / (b * law.B)) ** (1 / (a + b))
    x = C / flops_per_param_image
    n_opt = G * x ** (b / (a + b))
    return n_opt, x / n_opt


def compute_optimal(law: LossLaw, C: float, flops_per_param_image: float,
                    fixed_flops_per_image: float = 0.0) -> tuple[float, float]:
    """Compute-optimal (N, D) under C = D (k N + c0), c0 being per-image cost that does not grow
    with the trunk (the AIM prediction head); found numerically over log N."""
    from scipy.optimize import minimize_scalar

    def loss(log_n: float) -> float:
        n = math.exp(log_n)
        return float(law(n, C / (flops_per_param_image * n + fixed_flops_per_image)))

    hi = math.log(C / flops_per_param_image)   # at least one image
    res = minimize_scalar(loss, bounds=(0.0, hi), method="bounded", options={"xatol": 1e-10})
    n = math.exp(res.x)
    return n, C / (flops_per_param_image * n + fixed_flops_per_image)


def flops_model(manifest: dict[str, Any]) -> tuple[float, float]:
    """(k, c0) with flops per image ~ k N + c0 for the compute-optimal trade-off: k = 6 x tokens
    per trunk parameter; for "aim", c0 = the prediction head's FLOPs per image at the sweep's base
    model (paid per image whatever the trunk). The attention term of "aim" grows with depth x
    width rather than with N and shrinks relative to it as models widen (about 2% of the trunk's
    FLOPs at h = 1536, s = 256), so it is left out of the trade-off; each run's C counts it."""
    s = manifest["tokens_per_image"]
    if manifest["flops"] == "6ND":
        return 6.0 * s, 0.0
    base = ModelConfig(**{k: v for k, v in manifest["base_model"].items()})
    return 6.0 * s, head_train_flops_per_image(base)


# =========================================================================== plotting

def _data_ticks(ax, values: np.ndarray, axis: str = "x") -> None:
    """On a short log axis matplotlib labels minor ticks until they overlap; with a few distinct
    values (a sweep's model or data sizes) label exactly those instead."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    u = np.unique(values)
    if len(u) > 8:
        return
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(FixedLocator(u))
    target.set_major_formatter(lambda v, _pos: _short(v))
    target.set_minor_locator(NullLocator())
    target.set_minor_formatter(NullFormatter())


def plot_fits(N, D, C, L, law: LossLaw, compute_law: Optional[ComputeLaw], out_dir: str | Path
              ) -> list[Path]:
    """fit.png (loss vs images per model size with the fitted curves; L(C) with the frontier) and
    residuals.png (log-residuals vs N and D, coloured by model size)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    N, D, C, L = (np.asarray(v, float) for v in (N, D, C, L))
    sizes = np.unique(N)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    color_of = {n: c for n, c in zip(sizes, colors)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    d_grid = np.geomspace(D.min() / 2, D.max() * 2, 100)
    for n, col in zip(sizes, colors):
        sel = N == n
        ax.scatter(D[sel], L[sel], color=col, s=18, label=f"N={n:.3g}")
        ax.plot(d_grid, law(n, d_grid), color=col, lw=1)
    lo, hi = L.min(), L.max()
    if law.E > lo / 3:   # a floor near the data: draw it
        ax.axhline(law.E, color="gray", ls=":", lw=1, label=f"E={law.E:.3g}")
        lo = min(lo, law.E)
    else:                # E -> 0 (no floor in range): a line at 1e-300 would flatten the plot
        ax.plot([], [], " ", label=f"E={law.E:.2g} (no floor in range)")
    ax.set_ylim(lo / 1.1, hi * 1.1)
    ax.set(xscale="log", yscale="log", xlabel="images seen D", ylabel="loss",
           title=f"L = E + A/N^{law.alpha:.3f} + B/D^{law.beta:.3f}")
    _data_ticks(ax, D)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.scatter(C, L, s=14, color="tab:gray", label="runs")
    fc, fl = compute_frontier(C, L)
    ax.scatter(fc, fl, s=22, color="tab:red", label="frontier")
    if compute_law is not None:
        c_grid = np.geomspace(C.min() / 2, C.max() * 10, 100)
        ax.plot(c_grid, compute_law(c_grid), color="tab:red",
                label=f"L(C) = {compute_law.E:.3g} + {compute_law.K:.3g} C^-{compute_law.gamma:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="loss", title="L(C)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fit_png = out_dir / "fit.png"
    fig.savefig(fit_png, dpi=110)
    plt.close(fig)

    resid = np.log(L) - np.log(law(N, D))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    point_colors = [color_of[n] for n in N]
    for ax, x, label in ((axes[0], N, "trunk params N"), (axes[1], D, "images seen D")):
        ax.scatter(x, resid, s=14, c=point_colors)
        ax.axhline(0, color="gray", lw=1)
        ax.set(xscale="log", xlabel=label)
        _data_ticks(ax, x)
    axes[0].set_ylabel("log L - log L_fit")
    fig.suptitle(f"residuals (colour: model size): rms {np.sqrt(np.mean(resid ** 2)):.4f}")
    fig.tight_layout()
    res_png = out_dir / "residuals.png"
    fig.savefig(res_png, dpi=110)
    plt.close(fig)
    return [fit_png, res_png]
