"""Planning a scaling-law sweep: read a grid spec (examples/sweeps/), resolve one trainer config per
(model size, data size or compute budget), write the run directories and the manifest (sweep.json).
"""
from __future__ import annotations

import copy
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from aim_megatron.config import Config, ConfigError, apply_overrides, config_from_dict, validate
from aim_megatron.scaling.sizing import train_flops_per_image, trunk_params

MANIFEST = "sweep.json"


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


def short_number(x: float) -> str:
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
        tags = [f"i{short_number(x)}" for x in spec.images] or [f"c{short_number(c)}" for c in spec.compute]
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
