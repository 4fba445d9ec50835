"""Checks (a)-(d) of the scale simulation on a world built by ``simulate_world``:

  (a) replica-0 shards cover every global tensor exactly once (megatron-core's
      ``validate_sharding_integrity`` over the world's metadata, as rank 0 runs it in a save);
  (b) the distributed optimizer's shard ranges cover every parameter exactly once across DP
      (megatron's own ``_build_model_gbuf_range`` evaluated for every DP rank);
  (c) per-rank weights + grads + optimizer bytes agree with ``sizing.estimate_memory`` within 2%;
  (d) a reshard to another world size / layout finds stored data for every target shard.

Each raises ``CheckFailed`` naming the check. Check (e), the data path, is in ``simulate_data``.
"""
from __future__ import annotations

import math
import time
from unittest import mock

import torch.distributed as dist

from aim_megatron.scaling.simulate_world import BufferLayout, CheckFailed, World
from aim_megatron.scaling.sizing import GIB, estimate_memory

MEMORY_TOLERANCE = 0.02


# --------------------------------------------------------------------------- (a) sharding integrity

def check_sharding(global_metadata: list[list]) -> float:
    """(a): megatron-core's own sharding-integrity validation (as run on global rank 0 during a save)
    over the world's metadata. Returns the seconds it took."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import validate_sharding_integrity

    start = time.perf_counter()
    # validate_sharding_integrity checks only on global rank 0 and asserts on bad shapes.
    with mock.patch.object(dist, "get_rank", lambda *a, **k: 0):
        try:
            validate_sharding_integrity(global_metadata)
        except (CheckpointingException, AssertionError) as exc:
            raise CheckFailed(f"check (a) failed: replica-0 shards do not cover the tensors exactly once: "
                              f"{str(exc)[:300]}") from None
    _check_irregular_coverage(global_metadata)
    return time.perf_counter() - start


def _check_irregular_coverage(global_metadata: list[list]) -> None:
    """Megatron defers shards without a regular grid to torch; none may exist here unchecked."""
    for shards in global_metadata:
        for s in shards:
            if getattr(s, "axis_fragmentations", 1) is None and getattr(s, "global_shape", None):
                raise CheckFailed(f"check (a) failed: {s.key} has an irregular sharding grid, which "
                                  f"megatron's validation skips")


# --------------------------------------------------------------------------- (b) distributed optimizer

class _GroupView:
    """The two methods megatron's range code asks of a data-parallel group."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def dp_shard_ranges(layout: BufferLayout, bucket_index: int, dp_rank: int, dp: int) -> dict[str, tuple[int, int]]:
    """Parameter ranges DP rank ``dp_rank`` owns in one bucket, by megatron's own
    ``DistributedOptimizer._build_model_gbuf_range`` run on the buffer's layout."""
    from types import SimpleNamespace

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    offset, numel = layout.buckets[bucket_index]
    bucket = SimpleNamespace(offset=offset, grad_data=SimpleNamespace(numel=lambda: numel))
    view = SimpleNamespace(data_parallel_group=_GroupView(dp_rank, dp), buckets=[None] * bucket_index + [bucket],
                           param_index_map={name: (s, e, None) for name, (s, e) in layout.param_index.items()})
    ranges = DistributedOptimizer._build_model_gbuf_range(view, bucket_index)["param_map"]
    return {name: (r["param"].start, r["param"].end) for name, r in ranges.items()}


def check_optimizer_shards(w: World) -> dict:
    """(b): over every DP rank, each parameter's optimizer state is owned exactly once, and the
    ranges computed for sampled DP ranks equal those their real DistributedOptimizer built."""
    if not w.cfg.parallel.use_distributed_optimizer:
        return {"buckets": 0, "max_ranges": 0}
    max_ranges, buckets = 0, 0
    for t, p in w.coordinates():
        base = w.at(t, p)
        sampled = [rs for rs in w.ranks.values() if rs.coordinate == (t, p)]
        for bi, layout in enumerate(base.buffers):
            buckets = max(buckets, len(layout.buckets))
            for k in range(len(layout.buckets)):
                offset, numel = layout.buckets[k]
                if numel % w.dp:
                    raise CheckFailed(f"check (b) failed: bucket {k} of rank {base.rank} has {numel} elements, "
                                      f"not a multiple of DP={w.dp}")
                in_bucket = {n: r for n, r in layout.param_index.items() if offset <= r[0] < offset + numel}
                pieces: dict[str, list] = {n: [] for n in in_bucket}
                for d in range(w.dp):
                    owned = dp_shard_ranges(layout, k, d, w.dp)
                    max_ranges = max(max_ranges, len(owned))
                    for name, rng in owned.items():
                        pieces[name].append(rng)
                for name, rngs in pieces.items():
                    rngs.sort()
                    end = 0
                    for s, e in rngs:
                        if s != end:
                            raise CheckFailed(f"check (b) failed: {name} (tp={t} pp={p}) optimizer state "
                                              f"{'overlaps' if s < end else 'has a gap'} at element {min(s, end)}")
                        end = e
                    if end != layout.param_numel[name]:
                        raise CheckFailed(f"check (b) failed: {name} (tp={t} pp={p}) optimizer state covers "
                                          f"{end} of {layout.param_numel[name]} elements across DP")
                for rs in sampled:
                    computed = dp_shard_ranges(layout, k, rs.dp_rank, w.dp)
                    if computed != rs.owned.get((bi, k), {}):
                        raise CheckFailed(f"check (b) failed: rank {rs.rank}'s DistributedOptimizer owns other "
                                          f"ranges than megatron's range map gives for dp={rs.dp_rank}")
    return {"buckets": buckets, "max_ranges": max_ranges}


# --------------------------------------------------------------------------- (c) memory

def check_memory(w: World) -> list[str]:
    """(c): each built rank's weights, grads and optimizer bytes against the estimator's stage."""
    est = estimate_memory(w.cfg, w.size)
    lines = []
    for rs in sorted(w.ranks.values(), key=lambda r: r.rank):
        stage = est.stages[rs.pp_rank]
        for what, got, want in (("weights", rs.weights_bytes, stage.weights),
                                ("grads", rs.grads_bytes, stage.grads),
                                ("optimizer", rs.optimizer_bytes, stage.optimizer),
                                ("total", rs.model_state_bytes, stage.model_states)):
            if want == 0 and got == 0:
                continue
            if abs(got - want) > MEMORY_TOLERANCE * max(want, 1):
                raise CheckFailed(f"check (c) failed: rank {rs.rank} (pp={rs.pp_rank} dp={rs.dp_rank}) holds "
                                  f"{got / GIB:.4f} GiB of {what}, the estimator says {want / GIB:.4f} GiB "
                                  f"({(got - want) / want:+.2%})")
        lines.append(f"  rank {rs.rank:6d} pp={rs.pp_rank} dp={rs.dp_rank}: weights {rs.weights_bytes / GIB:.3f} "
                     f"+ grads {rs.grads_bytes / GIB:.3f} + optimizer {rs.optimizer_bytes / GIB:.3f} GiB "
                     f"= {rs.model_state_bytes / GIB:.3f} (estimate {stage.model_states / GIB:.3f}, "
                     f"{(rs.model_state_bytes - stage.model_states) / stage.model_states:+.2%})")
    return lines


# --------------------------------------------------------------------------- (d) reshard

def _box(shard) -> tuple[tuple[int, ...], tuple[int, ...]]:
    # Stacked layers prepend axes (the layer index) that local_shape leaves out.
    return tuple(shard.global_offset), (1,) * shard.prepend_axis_num + tuple(shard.local_shape)


def _overlap(a, b) -> int:
    vol = 1
    for ao, al, bo, bl in zip(a[0], a[1], b[0], b[1]):
        lo, hi = max(ao, bo), min(ao + al, bo + bl)
        if hi <= lo:
            return 0
        vol *= hi - lo
    return vol


def stored_shards(w: World) -> dict[str, list]:
    """Replica-0 shards by key: what a save of this world writes (only DP rank 0 holds them)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

    out: dict[str, list] = {}
    for rs in w.ranks.values():
        for s in rs.shards:
            if isinstance(s, ShardedTensor) and is_main_replica(s.replica_id):
                out.setdefault(s.key, []).append(s)
    return out


def check_reshard(source: World, target: World) -> int:
    """(d): every shard the target world loads (each rank asks for its own shards, main replica or
    not) lies inside data the source world stored, with the same global shape. Returns the number
    of target shards checked."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = stored_shards(source)
    boxes = {k: [_box(s) for s in v] for k, v in stored.items()}
    checked = 0
    for rs in target.ranks.values():
        for s in rs.shards:
            if not isinstance(s, ShardedTensor):
                continue
            if s.key not in stored:
                raise CheckFailed(f"check (d) failed: target rank {rs.rank} loads {s.key}, which the "
                                  f"{source.size}-GPU checkpoint does not hold")
            if tuple(stored[s.key][0].global_shape) != tuple(s.global_shape):
                raise CheckFailed(f"check (d) failed: {s.key} is {tuple(stored[s.key][0].global_shape)} in the "
                                  f"checkpoint, {tuple(s.global_shape)} in the target layout")
            want = math.prod(_box(s)[1])
            got = sum(_overlap(_box(s), b) for b in boxes[s.key])
            if got != want:
                raise CheckFailed(f"check (d) failed: target rank {rs.rank}'s shard of {s.key} at "
                                  f"{tuple(s.global_offset)} finds {got} of {want} elements stored")
            checked += 1
    return checked

