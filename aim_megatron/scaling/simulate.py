"""Simulated large-world runs: one CPU process acts, rank by rank, as chosen ranks of a world of
thousands of GPUs (torch's fake process group) and checks what each rank would hold.

This module owns the command (``aim-simulate-scale``, ``tools/simulate_scale.py``): the layout from
the command line, the run of checks (a)-(e) and the growth table (``--growth``: how process groups,
checkpoint metadata, save plans, validation and optimizer bookkeeping grow with the number of
GPUs). The world is built by ``simulate_world``; checks (a)-(d) are in ``simulate_checks`` and (e),
the data path, in ``simulate_data``.
"""
from __future__ import annotations

import argparse
import gc
import pickle
import sys
import time
import warnings
from typing import Optional

from aim_megatron.config import Config, ConfigError
from aim_megatron.scaling import simulate_data
from aim_megatron.scaling.simulate_checks import (
    MEMORY_TOLERANCE, check_memory, check_optimizer_shards, check_reshard, check_sharding, dp_shard_ranges)
from aim_megatron.scaling.simulate_world import (
    CheckFailed, World, metadata_dp_ranks, simulate_world, world_metadata)
from aim_megatron.scaling.sizing import GIB, check_layout, resolve_config

__all__ = ["CheckFailed", "build_config", "check_sharding", "growth", "main", "run_checks",
           "simulate_world", "world_metadata"]


# --------------------------------------------------------------------------- checkpoint plan (growth)

def checkpoint_plan(w: World, global_metadata: list[list]) -> dict:
    """Costs of one save at this size: torch's global save plan over every rank's local plan, the
    pickled .metadata and the per-rank metadata exchange (``global_metadata``: all N ranks)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.planner import SavePlan
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    plans = []
    for rank in range(w.size):
        rs = w.ranks.get(rank)
        plans.append(rs.local_plan if rs is not None and rs.local_plan is not None else None)
    # A rank that was not built has its coordinate's non-zero DP replica plan: nothing to write.
    empty = SavePlan(items=[])
    sampled_empty = [rs for rs in w.ranks.values() if rs.dp_rank and rs.local_plan is not None]
    if any(rs.local_plan_items for rs in sampled_empty):
        raise CheckFailed("check (a) failed: a DP rank other than 0 plans to write data")
    plans = [p if p is not None else empty for p in plans]
    planner = MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False)
    planner.set_up_planner({}, is_coordinator=True)
    start = time.process_time()
    _, metadata = planner.create_global_plan(plans)
    global_plan_s = time.process_time() - start
    # The writer adds one storage record per item; file names as megatron's async writer makes them.
    metadata.storage_data = {
        MetadataIndex(item.index.fqn, item.index.offset, item.index.index): _StorageInfo(
            f"__{rank}_0.distcp", 0, 0) for rank, plan in enumerate(plans) for item in plan.items}
    sizes: dict[int, int] = {}   # not-built ranks share their list object: pickle each list once
    exchange = [sizes.setdefault(id(shards), len(pickle.dumps(shards))) for shards in global_metadata]
    return {"metadata_bytes": len(pickle.dumps(metadata)), "global_plan_s": global_plan_s,
            "exchange_bytes_per_rank": sum(exchange), "local_metadata_bytes": max(exchange),
            "local_plan_s": max(rs.local_plan_s for rs in w.ranks.values()),
            "write_items": sum(len(p.items) for p in plans)}


def validation_cpu_seconds(global_metadata: list[list]) -> float:
    """CPU seconds of check (a), megatron's validate_sharding_integrity, over these ranks. This process
    holds every built rank's state, which no real rank 0 does: frozen, garbage-collection passes
    during the validation do not walk it."""
    gc.freeze()
    try:
        start = time.process_time()
        check_sharding(global_metadata)
        return time.process_time() - start
    finally:
        gc.unfreeze()


def save_transient_bytes(w: World) -> int:
    """Host memory the checkpointer's fully_reshardable optimizer save allocates on every rank: megatron
    gathers param, exp_avg and exp_avg_sq (fp32) of the whole buffer (all DP shards) onto each rank
    (get_parameter_state_dp_zero with return_on_all_ranks, the default of that format)."""
    return max(3 * 4 * sum(b.numel for b in rs.buffers) for rs in w.ranks.values())


# --------------------------------------------------------------------------- entry points

def build_config(preset: str, gpus: int, tp: int, pp: int, vp: Optional[int], sp: bool,
                 distributed_optimizer: bool, micro_batch_size: int, global_batch_size: int,
                 params_dtype: str = "bf16", gpus_per_node: int = 8, extra: tuple = ()) -> Config:
    """The preset's H100 recipe with this layout; ConfigError (naming the fix) when it cannot run."""
    overrides = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.vp={'null' if vp is None else vp}",
                 f"parallel.sequence_parallel={str(sp).lower()}",
                 f"parallel.use_distributed_optimizer={str(distributed_optimizer).lower()}",
                 f"train.micro_batch_size={micro_batch_size}", f"train.global_batch_size={global_batch_size}",
                 f"train.params_dtype={params_dtype}", "model.backend=local", *extra]
    if not distributed_optimizer:
        overrides.append("parallel.overlap_param_gather=false")
    cfg = resolve_config(None, preset, overrides)
    if gpus < 1:
        raise ConfigError(f"--gpus={gpus}: must be >= 1")
    check_layout(cfg, gpus, gpus_per_node)
    return cfg


def run_checks(cfg: Config, gpus: int, reshard_cfg: Optional[Config], reshard_gpus: int,
               dp_samples: int = 3, data_shards: int = 200_000, samples_per_shard: int = 10_000,
               sample_dp_ranks: Optional[int] = None, log=print) -> None:
    """Checks (a)-(e) of one layout; raises CheckFailed naming the first that fails. Check (a) looks
    at every rank's metadata, or at ``sample_dp_ranks`` DP ranks of every coordinate."""
    p = cfg.parallel
    log(f"simulating {gpus} GPUs of {cfg.model.preset}: tp={p.tp} pp={p.pp} vp={p.vp} "
        f"sp={p.sequence_parallel} dp={p.data_parallel_size(gpus)} distributed optimizer="
        f"{p.use_distributed_optimizer} micro-batch {cfg.train.micro_batch_size} global batch "
        f"{cfg.train.global_batch_size} {cfg.train.params_dtype}")
    w = simulate_world(cfg, gpus, dp_samples, log=log)
    log(f"built {len(w.ranks)} ranks ({len(w.coordinates())} model-parallel coordinates at DP rank 0 + "
        f"{len(w.ranks) - len(w.coordinates())} sampled DP ranks)")
    meta = world_metadata(w, sample_dp_ranks)
    seconds = check_sharding(meta)
    keys = len({s.key for rs in w.ranks.values() for s in rs.shards})
    ranks = (f"{gpus} ranks" if len(meta) == gpus else
             f"{len(meta)} ranks ({len(meta) // len(w.coordinates())} of {w.dp} DP ranks, DP rank 0 included)")
    log(f"(a) ok: {keys} checkpoint keys (model + optimizer) of {ranks} covered exactly once by "
        f"replica-0 shards (megatron validate_sharding_integrity, {seconds:.1f}s)")
    b = check_optimizer_shards(w)
    log(f"(b) ok: distributed-optimizer ranges cover every parameter exactly once across DP={w.dp} "
        f"({b['buckets']} bucket(s) per buffer, at most {b['max_ranges']} param ranges per DP rank and bucket)"
        if p.use_distributed_optimizer else "(b) skipped: no distributed optimizer")
    for line in check_memory(w):
        log(line)
    log(f"(c) ok: weights + grads + optimizer bytes of {len(w.ranks)} ranks within "
        f"{MEMORY_TOLERANCE:.0%} of sizing.estimate_memory")
    if reshard_cfg is not None:
        target = simulate_world(reshard_cfg, reshard_gpus, dp_samples=1)
        n = check_reshard(w, target)
        rp = reshard_cfg.parallel
        log(f"(d) ok: reshard {gpus} -> {reshard_gpus} GPUs (tp={rp.tp} pp={rp.pp} vp={rp.vp}): "
            f"{n} target shards of {len(target.ranks)} ranks all map to stored data")
    for line in simulate_data.check_data(cfg, gpus, reshard_gpus if reshard_cfg is not None else None,
                                         reshard_cfg, data_shards, samples_per_shard):
        log(line)
    log(f"fully_reshardable optimizer save gathers {save_transient_bytes(w) / GIB:.2f} GiB of fp32 state "
        f"onto the host of every rank (transient)")


GROWTH_SIZES = (64, 256, 1024, 4096, 16384)


def growth_layout(preset: str, gpus: int) -> Config:
    """The layout the growth table uses: aim-7B TP8 PP4 VP2 SP, aim-600M TP1 PP1; global batch 4096,
    or one image per DP rank when DP exceeds it."""
    tp, pp, vp = (8, 4, 2) if preset == "aim-7B" else (1, 1, None)
    dp = gpus // (tp * pp)
    mbs = 1
    gbs = max(4096, dp)
    while (gbs // dp) % (pp if vp else 1):
        gbs += dp
    return build_config(preset, gpus, tp, pp, vp, tp > 1, True, mbs, gbs)


# Growth: checks (a) and (b) run over all N ranks up to this size. Beyond it, check (a) is timed over
# about VALIDATION_SAMPLE_RANKS ranks and scaled linearly to N (megatron's validation walks every
# rank's shard list once; its per-key setup is small next to 1,000 ranks' lists). The sampled time
# is printed below that size too, as a cross-check of the extrapolation.
FULL_VALIDATION_MAX = 4096
VALIDATION_SAMPLE_RANKS = 1024


def growth_row(preset: str, n: int, dp_samples: int = 1, full_validation_max: int = FULL_VALIDATION_MAX,
               sample_ranks: int = VALIDATION_SAMPLE_RANKS) -> dict:
    """One row of the growth table: ``preset`` in its growth layout on ``n`` GPUs."""
    cfg = growth_layout(preset, n)
    start = time.perf_counter()
    w = simulate_world(cfg, n, dp_samples, save_plans=True)
    plan = checkpoint_plan(w, world_metadata(w))
    sample = world_metadata(w, max(1, sample_ranks // len(w.coordinates())))
    sampled_s = validation_cpu_seconds(sample)
    full_s = validation_cpu_seconds(world_metadata(w)) if n <= full_validation_max else None
    # Check (b) evaluates megatron's range map for every DP rank (O(DP x parameters)); beyond the full
    # validation size only the bookkeeping is read, over the sampled DP ranks.
    b = check_optimizer_shards(w) if n <= full_validation_max else optimizer_bookkeeping(
        w, metadata_dp_ranks(w, max(1, sample_ranks // len(w.coordinates()))))
    p = cfg.parallel
    return dict(preset=preset, gpus=n, tp=p.tp, pp=p.pp, vp=p.vp, dp=w.dp,
                groups_s=max(rs.init_s for rs in w.ranks.values()), built=len(w.ranks), **plan,
                validation_s=full_s, validation_sample_ranks=len(sample),
                validation_extrapolated_s=sampled_s * n / len(sample),
                buckets=b["buckets"], ranges=b["max_ranges"], save_gather_bytes=save_transient_bytes(w),
                rng_common_bytes=max(rs.rng_state_bytes for rs in w.ranks.values()) * n,
                wall_s=time.perf_counter() - start)


def optimizer_bookkeeping(w: World, dp_ranks: list[int]) -> dict:
    """Buckets per buffer and the most param ranges one of ``dp_ranks`` owns in a bucket (megatron's
    range map), without check (b)'s coverage over all DP ranks."""
    buckets, max_ranges = 0, 0
    for t, p in w.coordinates():
        for layout in w.at(t, p).buffers:
            buckets = max(buckets, len(layout.buckets))
            for k in range(len(layout.buckets)):
                max_ranges = max(max_ranges, *(len(dp_shard_ranges(layout, k, d, w.dp)) for d in dp_ranks))
    return {"buckets": buckets, "max_ranges": max_ranges}


GROWTH_HEADER = ("| preset | GPUs | TP PP VP | DP | groups CPU s (first rank) | .metadata KiB | local plan CPU s | "
                 "global plan CPU s | validate CPU s, all N ranks | validate CPU s, sampled x N/sample | "
                 "metadata exchange MiB/rank | buckets | ranges/bucket | save gather GiB/rank | "
                 "common RNG MiB | wall s |")


def growth_line(row: dict) -> str:
    """A markdown table row; the extrapolated validation carries '~' and the sample size."""
    full = "not run" if row["validation_s"] is None else f"{row['validation_s']:.2f}"
    return (f"| {row['preset']} | {row['gpus']:,} | {row['tp']} {row['pp']} {row['vp'] or 1} | {row['dp']:,} | "
            f"{row['groups_s']:.2f} | {row['metadata_bytes'] / 1024:.1f} | {row['local_plan_s']:.3f} | "
            f"{row['global_plan_s']:.3f} | {full} | ~{row['validation_extrapolated_s']:.2f} "
            f"({row['validation_sample_ranks']:,} ranks) | {row['exchange_bytes_per_rank'] / 2 ** 20:.1f} | "
            f"{row['buckets']} | {row['ranges']} | {row['save_gather_bytes'] / GIB:.2f} | "
            f"{row['rng_common_bytes'] / 2 ** 20:.1f} | {row['wall_s']:.0f} |")


def growth(presets=("aim-600M", "aim-7B"), sizes=GROWTH_SIZES, dp_samples: int = 1,
           full_validation_max: int = FULL_VALIDATION_MAX, log=print) -> list[dict]:
    """The growth table, printed row by row as markdown as each size finishes."""
    rows = []
    log(GROWTH_HEADER)
    log("|" + "---|" * (GROWTH_HEADER.count("|") - 1))
    for preset in presets:
        for n in sizes:
            rows.append(growth_row(preset, n, dp_samples, full_validation_max))
            log(growth_line(rows[-1]))
    return rows


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="simulate_scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="aim-7B")
    ap.add_argument("--gpus", type=int, default=4096)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--vp", type=int, default=None)
    ap.add_argument("--sp", action="store_true", help="sequence parallel")
    ap.add_argument("--distributed-optimizer", action="store_true")
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--global-batch-size", type=int, default=4096)
    ap.add_argument("--params-dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--dp-samples", type=int, default=3, help="DP ranks besides 0 to build")
    ap.add_argument("--reshard-gpus", type=int, default=None,
                    help="check (d) against this world size (default: a quarter of --gpus)")
    ap.add_argument("--reshard-tp", type=int, default=None)
    ap.add_argument("--reshard-pp", type=int, default=None)
    ap.add_argument("--data-shards", type=int, default=200_000)
    ap.add_argument("--samples-per-shard", type=int, default=10_000)
    ap.add_argument("--sample-dp-ranks", type=int, default=None,
                    help="check (a) over this many DP ranks of every coordinate (DP rank 0 and the built "
                         "ones included) instead of all; only DP rank 0 holds main replicas")
    ap.add_argument("--growth", action="store_true", help="print the growth table instead")
    ap.add_argument("--growth-sizes", default=",".join(map(str, GROWTH_SIZES)))
    ap.add_argument("--growth-presets", default="aim-600M,aim-7B")
    ap.add_argument("--growth-full-validation-max", type=int, default=FULL_VALIDATION_MAX,
                    help="largest N at which check (a) runs over all N ranks in the growth table")
    return ap


def reshard_target(cfg: Config, gpus: int, args) -> tuple[Config, int]:
    """Default target: a quarter of the GPUs, half the TP and PP (at least 1), same batch."""
    p, t = cfg.parallel, cfg.train
    n = args.reshard_gpus or max(1, gpus // 4)
    tp = args.reshard_tp or max(1, p.tp // 2)
    pp = args.reshard_pp or max(1, p.pp // 2)
    vp = p.vp if pp > 1 and p.vp else None
    return build_config(cfg.model.preset, n, tp, pp, vp, p.sequence_parallel and tp > 1,
                        p.use_distributed_optimizer, t.micro_batch_size, t.global_batch_size,
                        t.params_dtype, args.gpus_per_node), n


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    warnings.filterwarnings("ignore", module="megatron")
    import logging
    logging.getLogger("megatron").setLevel(logging.ERROR)
    try:
        if args.growth:
            try:
                sizes = tuple(int(s) for s in args.growth_sizes.split(","))
            except ValueError:
                raise ConfigError(f"--growth-sizes={args.growth_sizes!r}: give GPU counts separated by commas, "
                                  f"e.g. 64,256,1024") from None
            presets = tuple(args.growth_presets.split(","))
            growth(presets, sizes, full_validation_max=args.growth_full_validation_max)
            print(f"simulate_scale: growth table for {len(presets)} presets x {len(sizes)} sizes done")
            return 0
        cfg = build_config(args.preset, args.gpus, args.tp, args.pp, args.vp, args.sp,
                           args.distributed_optimizer, args.micro_batch_size, args.global_batch_size,
                           args.params_dtype, args.gpus_per_node)
        target, n = reshard_target(cfg, args.gpus, args)
        run_checks(cfg, args.gpus, target, n, args.dp_samples, args.data_shards, args.samples_per_shard,
                   args.sample_dp_ranks)
    except ConfigError as exc:
        print(f"simulate_scale: {exc}", file=sys.stderr)
        return 1
    except CheckFailed as exc:
        print(f"simulate_scale: {args.gpus} GPUs, {exc}")
        return 1
    print(f"simulate_scale: {args.gpus} GPUs, all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
