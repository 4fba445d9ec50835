"""What happens before a run builds anything: the start-up summary (model, layout, estimated step
and run time from a measured matmul, a warning when the run is absurd for the device) and the
preflight checks of what a config needs from this machine."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import torch

from aim_megatron import cli
from aim_megatron import data
from aim_megatron.config import Config, ConfigError, num_microbatches
from aim_megatron.distributed import cpu_shims
from aim_megatron.scaling.flops import train_flops_per_image

# Fraction of a plain matmul's FLOP/s that whole training steps reach: ~0.3 measured on CPU
# (README, benchmarks/mfu.py), below the 45% MFU goal on H100s, so the estimate errs long.
STEP_EFFICIENCY = 0.3
# A step estimated longer than this is reported as absurd for the device.
ABSURD_STEP_SECONDS = 600.0


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.2g} s"


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
    step_s = step_flops / (world * rate * STEP_EFFICIENCY)
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
