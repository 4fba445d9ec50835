"""What happens before a run builds anything: the start-up summary (model, layout, estimated step
and run time from a measured matmul, the checkpoint interval the failure rate calls for, a warning
when the run is absurd for the device), settling train.save_interval=auto, and the preflight
checks of what a config needs from this machine."""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from aim_megatron import cli
from aim_megatron import data
from aim_megatron.config import Config, ConfigError, num_microbatches
from aim_megatron.distributed import cpu_shims
from aim_megatron.scaling.checkpoint_interval import IntervalPlan, describe, format_duration, plan_interval
from aim_megatron.scaling.flops import train_flops_per_image
from aim_megatron.training.metrics import STALLS_FILE

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
    step_s = estimated_step_seconds(cfg, world, rate)
    lines = [
        f"model {m.preset or 'custom'}: {trunk_params(m) / 1e6:,.1f}M trunk + {head_params(m) / 1e6:,.1f}M "
        f"head parameters ({m.num_layers} layers, width {m.hidden_size}, {m.num_heads} heads), "
        f"{m.image_size}px images in {m.num_patches} patches",
        f"{t.global_batch_size} images per step = micro-batch {t.micro_batch_size} x "
        f"{num_microbatches(cfg, world)} micro-batches x dp {dp}; layout tp={p.tp} pp={p.pp} "
        f"vp={p.vp or 1} dp={dp} on {world} process(es); {t.train_iters} steps in {t.params_dtype}",
        f"{step_flops / 1e12:,.3g} TFLOP per step; estimated {format_duration(step_s)} per step and "
        f"{format_duration(step_s * t.train_iters)} for the run ({device}; {STEP_EFFICIENCY:.0%} of it assumed)",
    ]
    lines += describe(checkpoint_plan(cfg, world, rate), world, t.gpu_mtbf_hours)
    problems = []
    if step_s > ABSURD_STEP_SECONDS:
        problems.append(f"about {format_duration(step_s)} per step")
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


def estimated_step_seconds(cfg: Config, world: int, matmul_flops_per_s: float) -> float:
    step_flops = train_flops_per_image(cfg.model) * cfg.train.global_batch_size
    return step_flops / (world * matmul_flops_per_s * STEP_EFFICIENCY)


def measured_in_earlier_segments(cfg: Config) -> tuple[Optional[float], Optional[float]]:
    """(seconds per step, seconds training stalled per save) measured by earlier segments of this
    run (its metrics.jsonl), None where not measured: the medians of the last records."""
    out = Path(cfg.train.output_dir)
    records = _json_lines(out / "metrics.jsonl")
    step_times = [cfg.train.global_batch_size / r["images_per_s"] for r in records
                  if isinstance(r.get("images_per_s"), (int, float)) and r["images_per_s"] > 0]
    stalls = [r["stall_s"] for r in _json_lines(out / STALLS_FILE)
              if isinstance(r.get("stall_s"), (int, float))]
    median = lambda xs: statistics.median(xs[-20:]) if xs else None
    return median(step_times), median(stalls)


def _json_lines(path: Path) -> list[dict]:
    records = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
    except OSError:
        pass
    return records


def checkpoint_plan(cfg: Config, world: int, matmul_flops_per_s: float) -> IntervalPlan:
    """The Young/Daly checkpoint interval, from the step time and save stall measured by earlier
    segments of this run where there are any, else estimated."""
    step_s, stall_s = measured_in_earlier_segments(cfg)
    return plan_interval(cfg, world, step_s or estimated_step_seconds(cfg, world, matmul_flops_per_s),
                         stall_s)


def settle_save_interval(cfg: Config, world: int, plan: Optional[IntervalPlan]) -> None:
    """Collective: train.save_interval=auto becomes rank 0's Young/Daly interval in steps on every
    rank (each rank's own measurements would differ)."""
    if cfg.train.save_interval != "auto":
        return
    import torch.distributed as dist
    steps = [plan.optimal_steps if plan is not None else None]
    dist.broadcast_object_list(steps, src=0)
    cfg.train.save_interval = int(steps[0])


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
    check_writable(out)


def check_writable(out: Path) -> None:
    """Write and remove a file in the output directory, or in its nearest existing parent when it
    does not exist yet (nothing is left behind: a run refused later for bad data writes nothing),
    so that a read-only or unreachable one fails here, in one line, and not at the first
    checkpoint hours later."""
    where = out
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        if not where.is_dir():
            raise NotADirectoryError(f"{where} is not a directory")
        fd, probe = tempfile.mkstemp(prefix=".write_check_", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"train.output_dir={out} cannot be written ({exc.strerror or exc}); choose "
                          f"a writable directory") from None
