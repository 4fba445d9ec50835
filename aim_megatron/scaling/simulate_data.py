"""Check (e) of the scale simulation: the data path of every data-parallel reader over a
DFN-2B+-like mix (a web-scale source of shards x samples and an ImageNet-sized one, 80/20), held
in memory as sample counts only, through the project's own position, split and mixing functions
(``sample_positions``, ``shard_bounds``, ``assign_sources``, ``prefix_lengths``).

Per epoch of each source, the DP readers' shards must be disjoint, complete and balanced; every
global batch must be split over the DP ranks without overlap or gap; the mix must hold per rank;
and after a resume at another DP size the global sample order (positions, source of each position,
prefix lengths) must continue unchanged.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from aim_megatron.config import Config
from aim_megatron.data.base import assign_sources, prefix_lengths, sample_positions, shard_bounds
from aim_megatron.scaling.simulate_world import CheckFailed

IMAGENET_TRAIN_SAMPLES = 1_281_167
MIX_WEIGHTS = (0.8, 0.2)
# Per-rank source counts are binomial; beyond this many standard deviations the mix is broken.
MIX_SIGMAS = 6.0
# Largest shard whose epoch order is materialised for the check (int64: 160 MB).
MAX_ORDER_CHECK = 20_000_000


def _fail(msg: str):
    raise CheckFailed(f"check (e) failed: {msg}")


def check_shard_split(num_samples: int, dp: int, name: str) -> tuple[int, int]:
    """Contiguous shards of every DP rank: disjoint, together [0, n), sizes within 1."""
    bounds = np.array([shard_bounds(num_samples, r, dp) for r in range(dp)], dtype=np.int64)
    if bounds[0, 0] != 0 or bounds[-1, 1] != num_samples or np.any(bounds[1:, 0] != bounds[:-1, 1]):
        _fail(f"{name}: DP shards of {num_samples} samples over {dp} ranks overlap or leave a gap")
    sizes = bounds[:, 1] - bounds[:, 0]
    if sizes.max() - sizes.min() > 1 or sizes.min() < 1:
        _fail(f"{name}: DP shard sizes range {sizes.min()}..{sizes.max()} over {dp} ranks")
    return int(sizes.min()), int(sizes.max())


def check_epoch_order(num_samples: int, dp: int, rank: int, seed: int) -> None:
    """A reader's epoch returns each sample of its shard exactly once (the torch loader's order)."""
    from aim_megatron.data.pil import _EpochBatches

    lo, hi = shard_bounds(num_samples, rank, dp)
    order = _EpochBatches(lo, hi, 1, seed, True, (0, 0)).order(0)
    if len(order) != hi - lo or not np.array_equal(np.sort(order), np.arange(lo, hi)):
        _fail(f"rank {rank}'s epoch order is not a permutation of its shard [{lo}, {hi})")


def step_positions(step: int, dp: int, micro_batch_size: int, global_batch_size: int) -> np.ndarray:
    """[dp, per-rank] positions of one global batch, as every rank's micro-batches give them."""
    per_rank = global_batch_size // dp
    n_micro = per_rank // micro_batch_size
    return np.stack([np.concatenate([sample_positions(step * n_micro + i, r, dp, micro_batch_size,
                                                      global_batch_size) for i in range(n_micro)])
                     for r in range(dp)])


def check_global_batches(dp: int, mbs: int, gbs: int, steps: list[int]) -> None:
    for step in steps:
        pos = step_positions(step, dp, mbs, gbs)
        if not np.array_equal(np.sort(pos.ravel()), np.arange(step * gbs, (step + 1) * gbs)):
            _fail(f"global batch {step} is not split over the {dp} DP ranks without overlap or gap")


def per_rank_mix(seed: int, dp: int, gbs: int, steps: int, weights) -> np.ndarray:
    """[dp, sources]: samples each DP rank draws from each source over ``steps`` global batches."""
    counts = np.zeros((dp, len(weights)), dtype=np.int64)
    per_rank = gbs // dp
    chunk = max(1, (1 << 22) // gbs)
    for first in range(0, steps, chunk):
        n = min(chunk, steps - first)
        pos = np.arange(first * gbs, (first + n) * gbs, dtype=np.int64)
        src = assign_sources(seed, pos, list(weights))
        rank = (pos % gbs) // per_rank
        np.add.at(counts, (rank, src), 1)
    return counts


def check_mix(cfg: Config, dp: int, num_samples: list[int], weights) -> str:
    """Over one epoch of the smallest source (globally), every rank draws the weighted share of each
    source within MIX_SIGMAS binomial deviations, and no rank exhausts its shard of a source far
    ahead of the others."""
    gbs = cfg.train.global_batch_size
    small = int(np.argmin(num_samples))
    share = weights[small] / sum(weights)
    steps = math.ceil(num_samples[small] / (share * gbs))
    counts = per_rank_mix(cfg.train.seed, dp, gbs, steps, weights)
    drawn = steps * gbs // dp
    worst = 0.0
    for s, w in enumerate(weights):
        p = w / sum(weights)
        expected, sigma = drawn * p, math.sqrt(drawn * p * (1 - p))
        dev = np.abs(counts[:, s] - expected).max()
        worst = max(worst, dev / max(sigma, 1e-9))
        if dev > MIX_SIGMAS * sigma + 1:
            _fail(f"source {s}: a DP rank draws {counts[:, s].min()}..{counts[:, s].max()} samples over "
                  f"{steps} steps, expected {expected:.0f} +- {sigma:.0f}")
    epochs = counts[:, small] / np.array([hi - lo for lo, hi in
                                           (shard_bounds(num_samples[small], r, dp) for r in range(dp))])
    return (f"mix over {steps} steps (one epoch of the {num_samples[small]:,}-sample source): worst rank "
            f"{worst:.1f} sigma from {share:.0%}; ranks finish that epoch at {epochs.min():.3f}.."
            f"{epochs.max():.3f} of their shard")


def check_resume(cfg: Config, dp: int, new_dp: int, step: int, weights) -> None:
    """Resume at global batch ``step`` on ``new_dp`` readers (same global batch): the new readers'
    positions form the same global batches, and each position keeps its source and prefix length."""
    t = cfg.train
    for s in (step, step + 1):
        before = step_positions(s, dp, t.micro_batch_size, t.global_batch_size)
        after = step_positions(s, new_dp, t.micro_batch_size, t.global_batch_size)
        if not np.array_equal(np.sort(before.ravel()), np.sort(after.ravel())):
            _fail(f"after a resume at DP={new_dp}, global batch {s} holds other samples than at DP={dp}")
        # Sources and prefix lengths are functions of the position alone (base.py); recomputing them
        # in the resumed run's order must give the same value per position.
        flat, again = np.sort(before.ravel()), np.sort(after.ravel())[::-1].copy()
        if not np.array_equal(assign_sources(t.seed, flat, list(weights))[::-1],
                              assign_sources(t.seed, again, list(weights))):
            _fail(f"after a resume at DP={new_dp}, global batch {s} draws from other sources")
        if not np.array_equal(prefix_lengths(t.seed, flat, cfg.model).numpy()[::-1],
                              prefix_lengths(t.seed, again, cfg.model).numpy()):
            _fail(f"after a resume at DP={new_dp}, global batch {s} gets other prefix lengths")


def resume_dp_sizes(cfg: Config, dp: int, new_dp: Optional[int]) -> list[int]:
    """DP sizes to resume on: the reshard target's and half of this one (nodes lost), where the
    global batch still splits into whole micro-batches."""
    t = cfg.train
    out = []
    for d in (new_dp, dp // 2):
        if d and d != dp and d not in out and t.global_batch_size % (d * t.micro_batch_size) == 0:
            out.append(d)
    return out


def check_data(cfg: Config, gpus: int, new_gpus: Optional[int], new_cfg: Optional[Config],
               shards: int = 200_000, samples_per_shard: int = 10_000) -> list[str]:
    """Check (e) for this world; returns report lines."""
    dp = cfg.parallel.data_parallel_size(gpus)
    web = shards * samples_per_shard
    sizes, names = [web, IMAGENET_TRAIN_SAMPLES], ["web", "imagenet"]
    lines = []
    for n, name in zip(sizes, names):
        if n < dp:
            _fail(f"{name} has {n} samples for {dp} DP readers")
        lo, hi = check_shard_split(n, dp, name)
        ordered = hi <= MAX_ORDER_CHECK
        if ordered:
            check_epoch_order(n, dp, dp - 1, cfg.train.seed)
        lines.append(f"  {name}: {n:,} samples, DP shards of {lo:,}..{hi:,} samples"
                     + (f" ({lo / samples_per_shard:,.1f} tar shards per reader)" if name == "web" else "")
                     + ("; last reader's epoch order is a permutation of its shard" if ordered else ""))
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    check_global_batches(dp, mbs, gbs, [0, 1, 12345])
    lines.append("  " + check_mix(cfg, dp, sizes, MIX_WEIGHTS))
    new_dp = new_cfg.parallel.data_parallel_size(new_gpus) if new_cfg is not None and new_gpus else None
    for d in resume_dp_sizes(cfg, dp, new_dp):
        check_shard_split(IMAGENET_TRAIN_SAMPLES, d, "imagenet after resume")
        check_shard_split(web, d, "web after resume")
        check_resume(cfg, dp, d, 1000, MIX_WEIGHTS)
        lines.append(f"  resume at global batch 1000 on DP={d} (was {dp}): same positions, sources and "
                     f"prefix lengths; each source's epoch restarts on the new shard split (loader.seek)")
    lines.append(f"(e) ok: {dp} DP readers over {shards:,} x {samples_per_shard:,} web + "
                 f"{IMAGENET_TRAIN_SAMPLES:,} ImageNet samples (80/20): disjoint, complete, balanced "
                 f"shards; global batches split exactly")
    return lines
