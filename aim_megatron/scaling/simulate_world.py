"""One CPU process acting, rank by rank, as chosen ranks of a world of thousands of GPUs (torch's
fake process group), and what each of those ranks holds.

For every model-parallel coordinate (tp rank, pp rank, with its virtual chunks) at DP rank 0, plus
a few sampled DP ranks, it initialises megatron-core's groups for that rank, builds the model, DDP
and the distributed optimizer on the meta device (shapes, no data) with the project's own
``build_model`` / ``build_optimizer``, and records the checkpoint metadata (megatron-core's
``sharded_state_dict`` of the model and of the optimizer in the checkpointer's format), the
distributed optimizer's buffers and the bytes of weights, grads and optimizer state.
``world_metadata`` then gives every rank's checkpoint metadata as a save would gather it.

Collectives of the fake group exchange nothing, so nothing here is gathered through them: each
rank's state is computed. The checks on a world are in ``simulate_checks``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import io
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional
from unittest import mock

import torch
import torch.distributed as dist

from aim_megatron.config import Config
from aim_megatron.scaling.sizing import GIB

class CheckFailed(RuntimeError):
    """A simulated check that does not hold; the message names the check."""



# --------------------------------------------------------------------------- one rank of a fake world

def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    """Global rank in megatron-core's default order (tp fastest, then dp, then pp)."""
    return tp_rank + tp * (dp_rank + dp * pp_rank)


# Megatron enumerates every group of the world on every rank; the enumeration depends on the
# world and layout only, so ranks of one world share it (the first rank built pays the full cost).
_RANK_GROUPS: dict[tuple, list[list[int]]] = {}


def _cached_rank_groups(generate, world_size: int, parallel_size: list[int], mask: list[bool]) -> list[list[int]]:
    key = (world_size, tuple(parallel_size), tuple(mask))
    if key not in _RANK_GROUPS:
        _RANK_GROUPS[key] = generate(world_size, parallel_size, mask)
    return [list(group) for group in _RANK_GROUPS[key]]   # RankGenerator shifts them in place


@contextlib.contextmanager
def fake_rank(cfg: Config, world: int, rank: int) -> Iterator[float]:
    """Be ``rank`` of a ``world``-process job with megatron's groups; yields the CPU seconds the
    groups took to create (CPU time: the machine may be shared). Gloo groups stay off: a fake store
    cannot make them."""
    from megatron.core import parallel_state
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from aim_megatron.distributed import cpu_shims
    cpu_shims.install()
    p = cfg.parallel
    start = time.process_time()
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        cached = functools.partial(_cached_rank_groups, parallel_state.generate_masked_orthogonal_rank_groups)
        with mock.patch.object(parallel_state, "generate_masked_orthogonal_rank_groups", cached):
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
                virtual_pipeline_model_parallel_size=p.vp, create_gloo_process_groups=False)
        seconds = time.process_time() - start
        from aim_megatron.distributed.parallel import seed_everything
        seed_everything(cfg.train.seed)   # the RNG tracker megatron's layers fork
        yield seconds
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@contextlib.contextmanager
def on_meta_device() -> Iterator[None]:
    """Let the project's build_model / build_optimizer run with meta tensors (shapes only).

    The CPU shims point megatron's ``torch.cuda.current_device()`` at the CPU; here it is the meta
    device, so DDP's buffers take no memory. Megatron checks ``param.type()`` for CUDA names, so
    meta tensors report them. The optimizer is asked not to use gloo groups (none exist).

    Megatron's optimizer all-gathers each rank's param-group keys over the whole world. The fake
    backend hands back this rank's own object in every slot, after pickling it N times (O(N) per
    rank); the slots are filled with it directly."""
    from aim_megatron.distributed import cpu_shims, parallel

    cpu_shims.install()
    original_type = torch.Tensor.type

    def type_with_cuda_names(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "meta":
            return original_type(self).replace("torch.meta.", "torch.cuda.", 1)
        return original_type(self, dtype, non_blocking, **kwargs)

    with torch.device("meta"), \
            mock.patch.object(cpu_shims, "device", lambda: torch.device("meta")), \
            mock.patch.object(cpu_shims._CudaOnCpu, "current_device", staticmethod(lambda: "meta")), \
            mock.patch.object(torch.Tensor, "type", type_with_cuda_names), \
            mock.patch.object(dist, "all_gather_object", _all_gather_object_of_fake_group), \
            mock.patch.object(parallel, "get_megatron_optimizer",
                              functools.partial(parallel.get_megatron_optimizer,
                                                use_gloo_process_groups=False)):
        yield


def _all_gather_object_of_fake_group(object_list: list, obj, group=None) -> None:
    object_list[:] = [obj] * len(object_list)


@dataclass
class BufferLayout:
    """One DDP param-and-grad buffer of a rank: where each parameter lives, bucket by bucket."""
    chunk: int
    numel: int                                   # padded
    param_index: dict[str, tuple[int, int]]      # parameter name -> [start, end) in the buffer
    param_numel: dict[str, int]
    buckets: list[tuple[int, int]]               # (offset, padded numel)


@dataclass
class RankState:
    """What one rank holds; sharded entries carry metadata only (no data)."""
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    init_s: float
    build_s: float
    shards: list                                 # model + optimizer ShardedTensor/ShardedObject
    buffers: list[BufferLayout]
    owned: dict[tuple[int, int], dict[str, tuple[int, int]]]   # (buffer, bucket) -> name -> param range
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    local_plan_items: int = 0
    local_plan_s: float = 0.0
    local_plan: object = None
    rng_state_bytes: int = 0

    @property
    def coordinate(self) -> tuple[int, int]:
        return self.tp_rank, self.pp_rank

    @property
    def model_state_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes


def _param_names(model: list) -> dict[int, str]:
    return {id(p): f"chunk{i}.{name}" for i, chunk in enumerate(model)
            for name, p in chunk.module.named_parameters()}


def _optimizer_bytes(optimizer) -> int:
    """fp32 master copies (bf16 training) plus every tensor of the Adam state this rank keeps."""
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        masters = getattr(opt, "shard_fp32_from_float16_groups", [])
        total += sum(t.numel() * t.element_size() for group in masters for t in group)
        for state in opt.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for k, v in state.items()
                         if torch.is_tensor(v) and k != "step")
    return total


def _optimizer_sharded_state_dict(optimizer, model_state: dict, fmt: str) -> dict:
    """The optimizer's entries in the checkpoint in format ``fmt`` (train.optimizer_checkpoint_format),
    as checkpointer.save builds them. The save path
    copies the state out to CPU; its metadata equals the load path's, which allocates buffers
    only, made here on the meta device."""
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer

    from aim_megatron.checkpoint.checkpointer import optimizer_metadata

    real_zeros = torch.zeros

    def meta_zeros(*args, **kwargs):
        kwargs["device"] = "meta"
        return real_zeros(*args, **kwargs)

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            with torch.device("cpu"):   # Adam's `step` must be a real tensor: megatron reads .item()
                opt._init_optimizer_states_with_dummy_values()
    with mock.patch.object(distrib_optimizer.torch, "zeros", meta_zeros):
        return optimizer.sharded_state_dict(model_state, is_loading=True,
                                            metadata=optimizer_metadata(fmt))


def _local_save_plan(state: dict):
    """The rank's torch.distributed.checkpoint save plan, as megatron's torch_dist strategy makes it."""
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, _replace_state_dict_keys_with_sharded_keys, mcore_to_pyt_state_dict)

    sharded, _common = save_preprocess(state, validate_access_integrity=False)
    sharded, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, True)
    planner = MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False)
    planner.set_up_planner(mcore_to_pyt_state_dict(sharded, False), is_coordinator=False)
    return planner.create_local_plan()


def build_rank(cfg: Config, world: int, rank: int, save_plan: bool = False) -> RankState:
    """Act as ``rank`` of the world and record its shards, buffers and bytes."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    from aim_megatron.checkpoint.checkpointer import _rank_rng_state, model_sharded_state_dict
    from aim_megatron.distributed import parallel

    with fake_rank(cfg, world, rank) as init_s:
        start = time.perf_counter()
        with on_meta_device():
            model = parallel.build_model(cfg)
            optimizer = parallel.build_optimizer(cfg, model)
        state = model_sharded_state_dict(model)
        state["optimizer"] = _optimizer_sharded_state_dict(optimizer, state,
                                                           cfg.train.optimizer_checkpoint_format)
        build_s = time.perf_counter() - start
        shards = [s.without_data() for s in nested_values(state) if isinstance(s, ShardedBase)]
        names = _param_names(model)
        buffers, owned = [], {}
        for chunk_index, chunk in enumerate(model):
            for buffer in chunk.buffers:
                layout = BufferLayout(
                    chunk_index, buffer.numel,
                    {names[id(p)]: (start_, end) for p, (start_, end, _) in buffer.param_index_map.items()},
                    {names[id(p)]: p.numel() for p in buffer.params},
                    [(b.offset, b.numel_unpadded if not cfg.parallel.use_distributed_optimizer
                      else b.grad_data.numel()) for b in buffer.buckets])
                buffers.append(layout)
        if cfg.parallel.use_distributed_optimizer:
            for opt in optimizer.chained_optimizers if hasattr(optimizer, "chained_optimizers") else [optimizer]:
                for gbuf_index, by_dtype in enumerate(opt.gbuf_ranges):
                    global_index = _global_buffer_index(opt, gbuf_index, model)
                    for bucket_ranges in by_dtype.values():
                        for bucket_index, ranges in enumerate(bucket_ranges):
                            owned[(global_index, bucket_index)] = {
                                names[id(p)]: (r["param"].start, r["param"].end)
                                for p, r in ranges["param_map"].items()}
        weights = sum(p.numel() * p.element_size() for chunk in model for p in chunk.module.parameters())
        grads = sum(b.grad_data.numel() * b.grad_data.element_size() for chunk in model for b in chunk.buffers)
        rs = RankState(rank, parallel_state.get_tensor_model_parallel_rank(),
                       parallel_state.get_pipeline_model_parallel_rank(),
                       parallel_state.get_data_parallel_rank(), init_s, build_s, shards, buffers, owned,
                       weights, grads, _optimizer_bytes(optimizer))
        rs.rng_state_bytes = len(_torch_save_bytes(_rank_rng_state()))
        if save_plan:
            start = time.process_time()
            rs.local_plan = _local_save_plan(state)
            rs.local_plan_s = time.process_time() - start
            rs.local_plan_items = len(rs.local_plan.items)
    return rs


def _global_buffer_index(opt, gbuf_index: int, model: list) -> int:
    """Index of the optimizer's ``gbuf_index``-th buffer among all chunks' buffers (in chunk order)."""
    target = opt.buffers[gbuf_index]
    flat = [b for chunk in model for b in chunk.buffers]
    return next(i for i, b in enumerate(flat) if b is target)


def _torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# --------------------------------------------------------------------------- the simulated world

@dataclass
class World:
    cfg: Config
    size: int
    ranks: dict[int, RankState] = field(default_factory=dict)

    @property
    def tp(self) -> int:
        return self.cfg.parallel.tp

    @property
    def pp(self) -> int:
        return self.cfg.parallel.pp

    @property
    def dp(self) -> int:
        return self.cfg.parallel.data_parallel_size(self.size)

    def coordinates(self) -> list[tuple[int, int]]:
        return [(t, p) for p in range(self.pp) for t in range(self.tp)]

    def at(self, tp_rank: int, pp_rank: int, dp_rank: int = 0) -> RankState:
        return self.ranks[rank_of(tp_rank, dp_rank, pp_rank, self.tp, self.dp)]


def sampled_dp_ranks(dp: int, count: int) -> list[int]:
    """DP ranks other than 0 to build: the last, the second and ones spread between."""
    if dp <= 1 or count <= 0:
        return []
    picks = [dp - 1, 1] + [dp * k // (count + 1) for k in range(1, count + 1)]
    out = []
    for r in picks:
        if 0 < r < dp and r not in out:
            out.append(r)
    return out[:count]


def simulate_world(cfg: Config, world: int, dp_samples: int = 3, save_plans: bool = False,
                   log=None) -> World:
    """Build DP rank 0 of every model-parallel coordinate and ``dp_samples`` more DP ranks, each at a
    different coordinate (round robin), so every DP position sampled is checked against DP rank 0."""
    w = World(cfg, world)
    coords = w.coordinates()
    todo = [(t, p, 0) for t, p in coords]
    todo += [(*coords[i % len(coords)], d) for i, d in enumerate(sampled_dp_ranks(w.dp, dp_samples))]
    for t, p, d in todo:
        rank = rank_of(t, d, p, w.tp, w.dp)
        # Megatron's optimizer runs gc.collect() per build; frozen objects (imports, ranks built so
        # far) are not traversed, so that cost stays constant instead of growing with the world.
        gc.freeze()
        try:
            rs = build_rank(cfg, world, rank, save_plan=save_plans)
        finally:
            gc.unfreeze()
        if (rs.tp_rank, rs.pp_rank, rs.dp_rank) != (t, p, d):
            raise CheckFailed(f"rank {rank}: megatron placed it at tp={rs.tp_rank} pp={rs.pp_rank} "
                              f"dp={rs.dp_rank}, expected tp={t} pp={p} dp={d} (rank order changed?)")
        w.ranks[rank] = rs
        if log:
            log(f"  rank {rank:6d} tp={t} pp={p} dp={d}: groups {rs.init_s:.2f}s, build {rs.build_s:.2f}s, "
                f"{len(rs.shards)} shards, {rs.model_state_bytes / GIB:.2f} GiB model states")
    return w


def _with_dp_replica(shard, dp_rank: int):
    rid = shard.replica_id
    if isinstance(rid, tuple):
        return dataclasses.replace(shard, replica_id=(*rid[:-1], dp_rank))
    return shard


def _same_except_dp(a, b) -> bool:
    strip = lambda s: (s.key, getattr(s, "global_shape", None), getattr(s, "global_offset", None),
                       getattr(s, "local_shape", None), getattr(s, "axis_fragmentations", None),
                       s.replica_id[:-1] if isinstance(s.replica_id, tuple) else s.replica_id)
    return strip(a) == strip(b)


def metadata_dp_ranks(w: World, sample: Optional[int] = None) -> list[int]:
    """DP ranks whose metadata a check looks at: all of them, or ``sample`` of them: DP rank 0 (the
    only one holding main replicas), every DP rank that was built, then ones spread between."""
    if sample is None or sample >= w.dp:
        return list(range(w.dp))
    chosen = {0} | {rs.dp_rank for rs in w.ranks.values()}
    for dp_rank in sampled_dp_ranks(w.dp, sample):
        if len(chosen) >= sample:
            break
        chosen.add(dp_rank)
    return sorted(chosen)


def world_metadata(w: World, sample_dp_ranks: Optional[int] = None) -> list[list]:
    """Every rank's sharded metadata, in rank order, as megatron's determine_global_metadata would
    gather it; with ``sample_dp_ranks``, only the ranks at ``metadata_dp_ranks`` (all coordinates of
    each). Built ranks give their own. A rank that was not built has exactly the metadata of
    DP rank 0 at its coordinate with its own DP index in replica_id; that rule is checked on every
    sampled DP rank first, and the not-built ranks then reuse a sampled DP rank's list (validation
    only tests whether a replica_id is all zeros, so the DP index itself does not change its result)."""
    non_main: dict[tuple[int, int], list] = {}
    for rs in w.ranks.values():
        if rs.dp_rank == 0:
            continue
        base = w.at(rs.tp_rank, rs.pp_rank).shards
        if len(base) != len(rs.shards) or not all(
                _same_except_dp(a, b) and _dp_index(b) == rs.dp_rank for a, b in zip(base, rs.shards)):
            raise CheckFailed(f"check (a) failed: rank {rs.rank} (dp={rs.dp_rank}) does not hold DP rank 0's "
                              f"shards with its own replica index")
        non_main.setdefault(rs.coordinate, rs.shards)
    out = []
    dp_ranks = metadata_dp_ranks(w, sample_dp_ranks)
    for rank in sorted(rank_of(t, d, p, w.tp, w.dp) for d in dp_ranks for t, p in w.coordinates()):
        if rank in w.ranks:
            out.append(w.ranks[rank].shards)
            continue
        t, p = rank % w.tp, rank // (w.tp * w.dp)
        if (t, p) not in non_main:   # no DP rank sampled at this coordinate: derive one
            non_main[(t, p)] = [_with_dp_replica(s, 1) for s in w.at(t, p).shards]
        out.append(non_main[(t, p)])
    return out


def _dp_index(shard) -> int:
    return shard.replica_id[-1] if isinstance(shard.replica_id, tuple) else shard.replica_id

