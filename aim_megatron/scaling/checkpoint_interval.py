"""The checkpoint interval set by the failure rate: how often a run of N GPUs fails, how long a
save stalls training, and the interval that minimises the total time lost (Young/Daly).

Failure rate: Llama 3's pre-training (Dubey et al., "The Llama 3 Herd of Models", arXiv 2407.21783,
section 3.3.4) had 419 unexpected interruptions in a 54-day snapshot on 16,384 H100 GPUs, 78% of
them hardware. Spread over the GPUs that is one failure per GPU every 54 d x 24 h x 16,384 / 419
~= 50,700 GPU-hours; a job of N GPUs fails N times as often (MTBF_job = MTBF_gpu / N).

Young/Daly: a checkpoint every T seconds costs stall/T of the time, and a failure loses on average
T/2 of recomputed work, a fraction T/(2 x MTBF). The sum is least at T = sqrt(2 x stall x MTBF)
(Young 1974; Daly 2006, first-order form).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from aim_megatron.config import Config
from aim_megatron.scaling.sizing import head_params, trunk_params

LLAMA3_INTERRUPTIONS = 419
LLAMA3_DAYS = 54
LLAMA3_GPUS = 16384
# Per-GPU mean time between unexpected interruptions, hours (~50,677).
LLAMA3_GPU_MTBF_HOURS = LLAMA3_DAYS * 24 * LLAMA3_GPUS / LLAMA3_INTERRUPTIONS

# Assumed bandwidths for a save stall not yet measured, per writing process: a synchronous save
# waits for its bytes to reach the filesystem (1 GB/s per process: a parallel filesystem shared by
# thousands of writers); an asynchronous one only for their copy to host memory (10 GB/s: pinned
# device-to-host over PCIe, or a memory copy on CPU).
ASSUMED_WRITE_BYTES_PER_S = 1e9
ASSUMED_STAGING_BYTES_PER_S = 10e9


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unbounded"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.2g} s"


def checkpoint_bytes(cfg: Config) -> float:
    """Bytes of one checkpoint: the model's weights in train.params_dtype, the fp32 main copy that
    bf16 training keeps, and Adam's two fp32 moments (the LR schedule, RNG and data positions are
    negligible)."""
    params = trunk_params(cfg.model) + head_params(cfg.model)
    per_param = 8 + (2 + 4 if cfg.train.params_dtype == "bf16" else 4)
    return float(params * per_param)


def bytes_written_per_rank(cfg: Config, world: int) -> float:
    """A rank's share of the checkpoint: a fully parallel save spreads the data-parallel replicas'
    writes over every rank; otherwise the first replica of each TP x PP shard writes it all."""
    p = cfg.parallel
    writers = world if cfg.train.fully_parallel_save else p.tp * p.pp
    return checkpoint_bytes(cfg) / max(1, min(writers, world))


def estimated_save_stall_s(cfg: Config, world: int) -> float:
    """Seconds training waits per save, from the bytes and the assumed bandwidths above."""
    rate = ASSUMED_STAGING_BYTES_PER_S if cfg.train.async_save else ASSUMED_WRITE_BYTES_PER_S
    return bytes_written_per_rank(cfg, world) / rate


def job_mtbf_s(cfg: Config, world: int) -> float:
    return cfg.train.gpu_mtbf_hours * 3600.0 / max(1, world)


def young_daly_interval_s(stall_s: float, mtbf_s: float) -> float:
    return math.sqrt(2.0 * max(stall_s, 0.0) * mtbf_s)


@dataclass
class IntervalPlan:
    """What the failure rate implies for this run's checkpoints."""
    mtbf_s: float          # the job's mean time between failures
    stall_s: float         # training time lost per save
    stall_measured: bool   # measured in an earlier segment of this run (else estimated)
    step_s: float          # seconds per training step
    optimal_s: float       # Young/Daly interval
    optimal_steps: int
    interval_steps: int    # the interval in use (train.save_interval, or optimal_steps for auto)

    @property
    def lost_per_failure_s(self) -> float:
        """Work recomputed after a failure, on average: half the interval (plus the restart)."""
        interval_s = (self.interval_steps or 0) * self.step_s
        return interval_s / 2 if interval_s else float("nan")

    def overhead(self) -> float:
        """Fraction of the run lost to saves and to recomputation after failures."""
        interval_s = self.interval_steps * self.step_s
        if interval_s <= 0:
            return float("nan")
        return self.stall_s / interval_s + interval_s / (2 * self.mtbf_s)


def plan_interval(cfg: Config, world: int, step_s: float,
                  measured_stall_s: Optional[float] = None) -> IntervalPlan:
    """The Young/Daly interval for this run, in seconds and in steps (at least 1), with the stall
    measured where known, else estimated."""
    mtbf = job_mtbf_s(cfg, world)
    stall = measured_stall_s if measured_stall_s is not None else estimated_save_stall_s(cfg, world)
    optimal_s = young_daly_interval_s(stall, mtbf)
    optimal_steps = max(1, int(round(optimal_s / max(step_s, 1e-9))))
    chosen = cfg.train.save_interval
    interval = optimal_steps if chosen == "auto" else int(chosen)
    return IntervalPlan(mtbf, stall, measured_stall_s is not None, step_s, optimal_s, optimal_steps,
                        interval)


def describe(plan: IntervalPlan, world: int, gpu_mtbf_hours: float) -> list[str]:
    """Lines for the start-up summary and the Slurm layout dry run."""
    source = "measured" if plan.stall_measured else "estimated"
    lines = [
        f"failures: one per {format_duration(plan.mtbf_s)} on {world} device(s) (per-GPU MTBF "
        f"{gpu_mtbf_hours:,.0f} h, Llama 3: 419 interruptions in 54 days on 16,384 GPUs, arXiv "
        f"2407.21783 sec. 3.3.4); save stall {format_duration(plan.stall_s)} ({source})",
        f"checkpoint interval minimising lost time (Young/Daly sqrt(2 x stall x MTBF)): "
        f"{format_duration(plan.optimal_s)} = {plan.optimal_steps} steps",
    ]
    if plan.interval_steps:
        lines.append(f"with a checkpoint every {plan.interval_steps} steps: expected "
                     f"{format_duration(plan.lost_per_failure_s)} of work lost per failure (half an "
                     f"interval, plus the restart), {plan.overhead():.2%} of the run lost to saves "
                     f"and failures")
    else:
        lines.append("train.save_interval=0: a failure loses everything since the start of this "
                     "segment; set train.save_interval=auto")
    return lines
