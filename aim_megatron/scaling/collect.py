"""Collecting a sweep: read each run's metrics.jsonl (records cut by a kill, steps re-logged after a
resume), decide whether the run is complete, and gather final and intermediate losses into
results.json / results.csv.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from aim_megatron.scaling.plan import load_manifest

RESULTS = "results.json"


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
