"""Checkpoints with megatron-core dist_checkpointing (torch_dist): model, optimizer (distributed
optimizer in the fully reshardable format), LR schedule, step, RNG states and data position.

Layout on disk::

    <output_dir>/checkpoints/step_00000100/   dist_checkpointing files + aim_meta.json
    <output_dir>/checkpoints/latest           "step_00000100", replaced atomically, last

A save writes ``.tmp_step_*`` and renames it once every rank's files are complete, so a crash or
SIGKILL mid-save never touches the last good checkpoint; ``latest`` only ever names a complete
directory. The files may be written in the background (``start_save`` returns megatron-core's
AsyncRequest: its async_fn writes, its finalize functions publish the checkpoint on every rank),
and data-parallel replicas spread their writes over the data-parallel ranks (megatron's fully
parallel save strategy). Because the checkpoint is stored by global tensor keys, any TP/PP/VP/DP
layout can load it (resharding). A resume from ``latest`` that cannot read it falls back to the
newest readable older checkpoint (``load_newest_readable``).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica
from megatron.core.dist_checkpointing.serialization import (get_default_load_sharded_strategy,
                                                            get_default_save_sharded_strategy)
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.strategies.fully_parallel import (FullyParallelLoadStrategyWrapper,
                                                                       FullyParallelSaveStrategyWrapper)
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.tensor_parallel import random as mcore_random
# torch's checkpoint errors derive from BaseException, not Exception.
from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

from aim_megatron import cli
from aim_megatron.checkpoint import pickled_files
from aim_megatron.config import Config
from aim_megatron.distributed import cpu_shims

log = logging.getLogger(__name__)

META_FILE = "aim_meta.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 1
# How the distributed optimizer's state is stored: train.optimizer_checkpoint_format, recorded in
# aim_meta.json ("optimizer_format"); checkpoints without the record hold the fully reshardable one.
DEFAULT_OPTIMIZER_FORMAT = "fully_reshardable"


def optimizer_metadata(fmt: str) -> dict:
    """What megatron-core's distributed optimizer is told about the format it saves or loads."""
    return {"distrib_optim_sharding_type": fmt}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or written; the message names the path and what to do."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files are missing, truncated or unreadable (not one that is readable but
    does not fit this run): a resume from ``latest`` skips it for an older one."""


def _unwrap(chunk):
    return chunk.module if hasattr(chunk, "module") else chunk


def model_sharded_state_dict(model: list) -> dict:
    if len(model) == 1:
        return {"model": _unwrap(model[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model)}


def _rank_rng_state() -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": mcore_random.get_cuda_rng_tracker().get_states()}


def _restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    mcore_random.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size(),
            "world": dist.get_world_size()}


def _gather_to_all(obj: Any) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _agree(problem: Optional[str]) -> Optional[str]:
    """Collective: the first rank's problem (named by rank), or None when no rank has one, so that
    every rank takes the same way out of a save or load that failed on some."""
    found = [(rank, text) for rank, text in enumerate(_gather_to_all(problem)) if text]
    if not found:
        return None
    rank, text = found[0]
    return text if rank == 0 else f"(rank {rank}) {text}"


def _cause(exc: BaseException) -> str:
    """One line for a failed read or write: the first failing rank's innermost error, not the
    tracebacks torch's CheckpointException embeds in its text."""
    failures = getattr(exc, "failures", None)  # torch CheckpointException: {rank: (error, traceback)}
    if failures:
        rank, wrapped = sorted(failures.items())[0]
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        return f"rank {rank}: {_cause(inner)}"
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = cli.one_line(exc)
    return f"{type(exc).__name__}: {text[:300]}"


def _is_disk_full(exc: BaseException) -> bool:
    seen = [exc]
    while seen:
        e = seen.pop()
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        for wrapped in (getattr(e, "failures", None) or {}).values():
            seen.append(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
        seen += [c for c in (e.__cause__, e.__context__) if c is not None]
    return False


# --------------------------------------------------------------------------- paths

def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def resolve(root: Path, which: str = "latest") -> Optional[Path]:
    """The checkpoint directory named by ``which`` ("latest" or a path); None if there is none."""
    root = Path(root)
    if which != "latest":
        path = Path(which)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist; pass an existing step_* "
                                  f"directory or --resume auto")
        return path
    pointer = root / LATEST_FILE
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointDamaged(f"{pointer} names {path.name}, which does not exist; point --resume "
                                f"at an existing step_* directory in {root}")
    return path


def resume_candidates(root: Path) -> tuple[list[Path], list[str]]:
    """The checkpoints a resume from ``latest`` may load, newest first: the one ``latest`` names,
    then the complete-looking step_* directories older than it (never a ``.tmp_step_*``, never one
    newer than ``latest``, whose save did not finish). Also the problems already found, e.g. a
    ``latest`` naming a directory that is gone. Empty when there is no ``latest``."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if not pointer.exists():
        return [], []
    named = pointer.read_text().strip()
    skipped = []
    try:
        newest = [resolve(root)]
    except CheckpointDamaged as exc:
        newest, skipped = [], [f"{named or LATEST_FILE} ({exc})"]
    older = sorted((p for p in root.glob("step_*") if p.is_dir() and p.name < named), reverse=True)
    return newest + older, skipped


def read_meta(path: Path) -> dict:
    meta_file = Path(path) / META_FILE
    if not meta_file.exists() or not (Path(path) / "metadata.json").exists():
        raise CheckpointDamaged(f"{path} is not a complete aim-megatron checkpoint ({META_FILE} or "
                                f"metadata.json missing); resume from an older step_* directory")
    try:
        return json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # not JSON, or not even text
        raise CheckpointDamaged(f"{meta_file} is corrupt ({exc}); resume from an older checkpoint") from exc


def config_from_checkpoint(path: Path, overrides: Optional[list[str]] = None) -> Config:
    """The config a checkpoint was trained with, plus ``section.key=value`` overrides."""
    from aim_megatron.config import apply_overrides, config_from_dict
    return config_from_dict(apply_overrides(read_meta(path)["config"], overrides or []))


# --------------------------------------------------------------------------- compatibility

# Fields that change what the checkpoint means; anything else (lr, iterations, intervals,
# layout) may change between runs.
_MUST_MATCH = {
    "model": None,  # every architecture field
    "train": ("seed", "global_batch_size", "params_dtype"),
    "data": ("train_sources", "train_weights"),
}


def config_mismatches(saved: dict, cfg: Config) -> list[str]:
    now = cfg.to_dict()
    problems = []
    for section, fields in _MUST_MATCH.items():
        old_sec, new_sec = saved.get(section, {}), now[section]
        for key in fields or new_sec.keys():
            if key in ("backend", "attention_kernel"):  # implementation choices, same weights
                continue
            if key in old_sec and old_sec[key] != new_sec[key]:
                problems.append(f"{section}.{key}: checkpoint {old_sec[key]!r}, config {new_sec[key]!r}")
    return problems


# --------------------------------------------------------------------------- save / load

def save_strategy(fully_parallel: bool):
    """The sharded save strategy (torch_dist), spreading the writes of data-parallel replicas over
    the data-parallel ranks when ``fully_parallel``. Keep one for a run: it caches the spread."""
    strategy = get_default_save_sharded_strategy()
    if fully_parallel and parallel_state.get_data_parallel_world_size() > 1:
        strategy = FullyParallelSaveStrategyWrapper(
            strategy, parallel_state.get_data_parallel_group(with_context_parallel=True),
            do_cache_distribution=True)
    return strategy


def load_strategy(path: Path, fully_parallel: bool):
    """The sharded load strategy for ``path``: None (megatron-core's default: every rank reads all
    it needs), or, when ``fully_parallel`` and there are data-parallel replicas, the default
    wrapped so that each replica is read once in the data-parallel group and exchanged."""
    if not (fully_parallel and parallel_state.model_parallel_is_initialized()
            and parallel_state.get_data_parallel_world_size() > 1):
        return None
    return FullyParallelLoadStrategyWrapper(
        get_default_load_sharded_strategy(str(path)),
        parallel_state.get_data_parallel_group(with_context_parallel=True))


@dataclass
class PendingSave:
    """A started save: ``request.async_fn`` writes this rank's files (now, or in a background
    process), then ``request.finalize_fns``, on every rank, check that all writes succeeded and
    publish the checkpoint (rename, ``latest``, pruning)."""
    step: int
    final: Path
    request: AsyncRequest


def _sharded_bytes(state: dict) -> float:
    """Bytes of the tensor shards this rank holds as main replica: summed over the ranks, the
    size of the checkpoint's tensors (each shard has exactly one main replica)."""
    return float(sum(v.data.numel() * v.data.element_size() for v in nested_values(state)
                     if isinstance(v, ShardedTensor) and is_main_replica(v.replica_id)
                     and v.data is not None))


def _format_gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


def _prepare_directories(root: Path, tmp: Path, needed: float) -> Optional[str]:
    """Rank 0: the save's directory, after removing what interrupted saves left; a problem (an
    unwritable root, too little space for ``needed`` bytes) as one line."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_step_*"):  # left by an interrupted save
            shutil.rmtree(stale, ignore_errors=True)
        free = shutil.disk_usage(root).free
        if free < needed:
            return (f"no space for checkpoint {tmp.name[5:]} in {root}: it needs about "
                    f"{_format_gb(needed)}, {_format_gb(free)} free; free space or set "
                    f"train.output_dir elsewhere (the previous checkpoint is intact)")
        tmp.mkdir()
    except OSError as exc:
        return f"cannot write checkpoints to {root}: {cli.one_line(exc)}"
    return None


def start_save(root: Path, step: int, cfg: Config, model: list, optimizer, scheduler,
               trainer_state: dict, data_state: Any = None, keep_last: int = 0,
               strategy=None, validate: bool = True) -> PendingSave:
    """Collective: every rank calls it. Snapshots the state and plans the write; the returned
    request writes and publishes it (``execute_sync``, or megatron's AsyncCallsQueue).

    ``validate`` checks that every shard is written exactly once and that the common state agrees
    across ranks (an all-gather of every rank's shard metadata): needed on a run's first save
    only, as the layout does not change within a run."""
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}"
    rank0 = dist.get_rank() == 0

    rng_states = _gather_to_all(_rank_rng_state())
    data_states = _gather_to_all(data_state)
    state = model_sharded_state_dict(model)
    optimizer_format = cfg.train.optimizer_checkpoint_format
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False,
                                                      metadata=optimizer_metadata(optimizer_format))
    total = torch.tensor([_sharded_bytes(state)], dtype=torch.float64, device=cpu_shims.device())
    dist.all_reduce(total)  # on the device: NCCL reduces no CPU tensors
    # Tensors plus ~5% for common.pt (RNG, data positions, schedule) and the metadata files.
    needed = float(total.item()) * 1.05 + 1e6
    problem = _agree(_prepare_directories(root, tmp, needed) if rank0 else None)
    if problem:
        raise CheckpointError(problem)

    state["scheduler"] = scheduler.state_dict()
    state["trainer"] = trainer_state
    state["rng"] = rng_states
    state["data"] = data_states
    strategy = strategy or save_strategy(cfg.train.fully_parallel_save)
    request = dist_checkpointing.save(state, str(tmp), sharded_strategy=strategy,
                                      async_sharded_save=True, validate_access_integrity=validate)
    # megatron's own last finalize step writes metadata.json on rank 0 alone and then waits at a
    # barrier: a failure there would leave the other ranks waiting. It is done in _publish,
    # where a failure on rank 0 reaches every rank.
    writes_done = [fn for fn in request.finalize_fns if fn.__name__ != "metadata_finalize_fn"]
    meta = {"format": FORMAT_VERSION, "step": step, "config": cfg.to_dict(), "layout": _layout()}
    if cfg.parallel.use_distributed_optimizer:
        meta["optimizer_format"] = optimizer_format
    publish = _publisher(root, tmp, final, meta, keep_last, needed, writes_done,
                         CheckpointingConfig(strategy.backend, strategy.version))
    request = request._replace(finalize_fns=[publish])
    return PendingSave(step, final, request)


def _publisher(root: Path, tmp: Path, final: Path, meta: dict, keep_last: int, needed: float,
               writes_done: list[Callable], config: CheckpointingConfig) -> Callable[[], None]:
    def publish() -> None:
        """Collective, after every rank's writer has ended: all writes succeeded (torch's
        finalize, which raises on every rank if any failed), then rank 0 renames and moves
        ``latest``. A failure anywhere leaves the previous checkpoint and ``latest`` as they were,
        removes the partial directory, and raises the same CheckpointError on every rank."""
        rank0 = dist.get_rank() == 0
        problem = None
        try:
            for fn in writes_done:
                fn()
        except (Exception, TorchCheckpointException) as exc:
            problem = _write_problem(root, final, needed, exc)
        if problem is None and rank0:
            try:
                save_config(config, str(tmp))
                _write_atomic(tmp / META_FILE, json.dumps(meta, indent=2))
                if final.exists():  # a re-save of the same step (e.g. preemption right after a save)
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _write_atomic(root / LATEST_FILE, final.name)
            except OSError as exc:
                problem = _write_problem(root, final, needed, exc)
        problem = _agree(problem)
        if problem:
            if rank0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(problem)
        if rank0 and keep_last > 0:
            _prune(root, keep_last, keep=final.name)
    return publish


def _write_problem(root: Path, final: Path, needed: float, exc: BaseException) -> str:
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = needed
    # torch.save's zip writer reports a full disk as "unexpected pos", without the errno.
    if _is_disk_full(exc) or free < needed:
        return (f"disk full while writing checkpoint {final.name} to {root}: it needs about "
                f"{_format_gb(needed)}, {_format_gb(free)} free now; free space or set "
                f"train.output_dir elsewhere (the previous checkpoint is intact)")
    return (f"could not write checkpoint {final.name} to {root}: {_cause(exc)} "
            f"(the previous checkpoint is intact)")


def save(root: Path, step: int, cfg: Config, model: list, optimizer, scheduler,
         trainer_state: dict, data_state: Any = None, keep_last: int = 0) -> Path:
    """Collective: every rank calls it. Writes and publishes before returning; returns the final
    checkpoint directory."""
    pending = start_save(root, step, cfg, model, optimizer, scheduler, trainer_state, data_state,
                         keep_last)
    pending.request.execute_sync()
    return pending.final


def _write_atomic(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def _prune(root: Path, keep_last: int, keep: str) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_newest_readable(root: Path, cfg: Config, model: list, optimizer=None, scheduler=None
                         ) -> Optional[tuple[Path, dict]]:
    """Collective. Loads the checkpoint ``latest`` names or, when it is damaged (files missing,
    truncated, unreadable), the newest older one every rank can read, with a warning naming what
    was skipped. All ranks agree on each attempt, so all load the same checkpoint. Returns (path,
    what ``load`` returns), None when there is no ``latest``; raises CheckpointError (one line)
    when no checkpoint is readable. A checkpoint that reads but does not fit this run is an error,
    not skipped: an older one would not fit either."""
    root = Path(root)
    candidates, skipped = resume_candidates(root)
    for path in candidates:
        problem = None
        try:
            restored = load(path, cfg, model, optimizer, scheduler)
        except CheckpointDamaged as exc:
            problem = cli.one_line(exc)
        problem = _agree(problem)
        if problem is None:
            if skipped and dist.get_rank() == 0:
                log.warning("resuming from %s: skipped the newer damaged checkpoint(s) %s",
                            path, "; ".join(skipped))
            return path, restored
        skipped.append(f"{path.name} ({problem})")
    if skipped:
        raise CheckpointError(f"no readable checkpoint in {root}: {'; '.join(skipped)}. Restore one, "
                              f"or start afresh with --resume none or a new train.output_dir")
    return None


def load(path: Path, cfg: Config, model: list, optimizer=None, scheduler=None) -> dict:
    """Collective. Loads model (+ optimizer, scheduler) in the current layout and restores RNG
    states when the layout is unchanged. Returns {"trainer", "data", "meta"}. Raises
    CheckpointDamaged for unreadable files, CheckpointError for a checkpoint that does not fit."""
    path = Path(path)
    meta = read_meta(path)
    problems = config_mismatches(meta.get("config", {}), cfg)
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not match this config:\n  " + "\n  ".join(problems)
            + f"\nUse the checkpoint's config (in {path / META_FILE}) or a new train.output_dir.")

    # An import writes the weights alone (streaming.save_weights_only): the optimizer and LR
    # schedule stay as freshly built, which is what a step-0 checkpoint holds anyway.
    weights_only = bool(meta.get("weights_only"))
    with_optimizer = optimizer is not None and not weights_only
    optimizer_format = meta.get("optimizer_format", DEFAULT_OPTIMIZER_FORMAT)
    if with_optimizer:
        changed = optimizer_layout_change(meta, cfg.parallel)
        if changed:
            saved = meta["config"]["parallel"]
            raise CheckpointError(
                f"checkpoint {path} holds the distributed optimizer's state in the dp_reshardable format, "
                f"which loads only in the TP/PP/VP layout it was written in ({changed}): resume with "
                f"parallel.tp={saved['tp']} parallel.pp={saved['pp']} "
                f"parallel.vp={'null' if saved['vp'] is None else saved['vp']}, or save with "
                f"train.optimizer_checkpoint_format=fully_reshardable before changing the layout")
        _prepare_optimizer_for_load(optimizer)
    state = model_sharded_state_dict(model)
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                          metadata=optimizer_metadata(optimizer_format))
    pickled_files.check(path, CheckpointDamaged)  # megatron-core unpickles .metadata with plain pickle
    try:
        # RETURN_UNEXPECTED: entries this model asks for that the checkpoint lacks come back
        # (and are left out of the read) instead of failing deep inside the reader.
        strategy = load_strategy(path, cfg.train.fully_parallel_load)
        if strategy is not None and dist.get_rank() == 0:
            log.info("fully parallel load of %s: each replicated tensor is read by one of the %d "
                     "data-parallel ranks and exchanged", path.name, parallel_state.get_data_parallel_world_size())
        loaded, _, absent = dist_checkpointing.load(state, str(path), sharded_strategy=strategy,
                                                    strict=StrictHandling.RETURN_UNEXPECTED)
    except (Exception, TorchCheckpointException) as exc:  # damaged files raise many kinds
        raise CheckpointDamaged(f"could not read checkpoint {path}: {_cause(exc)}. It may be "
                                f"damaged; resume from an older step_* directory") from exc
    # Transformer Engine's FP8 metadata (`_extra_state`) is optional: a checkpoint written with the
    # local spec (CPU, conversion tools) loads into the TE spec, whose FP8 scales then start fresh.
    absent = sorted(k for k in absent if not _optional_on_load(k))
    if absent:
        raise CheckpointError(f"checkpoint {path} lacks {len(absent)} entries this run needs, e.g. "
                              f"{', '.join(absent[:3])}. Was it written by another version of "
                              f"aim-megatron? Convert it or start a new train.output_dir")

    for i, chunk in enumerate(model):
        key = "model" if len(model) == 1 else f"model{i}"
        _load_module(_unwrap(chunk), loaded[key], path)
    if with_optimizer:
        _place_adam_step(optimizer, loaded["optimizer"])
        with torch.no_grad():  # the dp_reshardable path copies into fp32 main params that are leaves
            optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_step(optimizer)
    if scheduler is not None and not weights_only:
        scheduler.load_state_dict(loaded["scheduler"])
    if weights_only:
        if optimizer is not None:
            optimizer.reload_model_params()  # main (fp32) params from the loaded weights
            log.warning("checkpoint %s holds weights only (an import): the optimizer state and LR "
                        "schedule start fresh at step %d", path, loaded["trainer"]["step"])
        return {"trainer": loaded["trainer"], "data": None, "meta": meta}

    same_layout = meta.get("layout") == _layout()
    if same_layout:
        _restore_rng_state(loaded["rng"][dist.get_rank()])
    data_state = loaded["data"][dist.get_rank()] if same_layout else None
    if not same_layout:
        log.warning("checkpoint layout %s differs from the current %s: model and optimizer are "
                    "resharded; RNG and data-loader states restart from the sample position",
                    meta.get("layout"), _layout())
    return {"trainer": loaded["trainer"], "data": data_state, "meta": meta}


def optimizer_layout_change(meta: dict, parallel) -> Optional[str]:
    """The dp_reshardable format stores each rank's own optimizer buffers, whose cut depends on the
    model-parallel layout: it serves only the TP/PP/VP it was written in. For a checkpoint in that
    format (``meta`` from aim_meta.json), the changes to ``parallel`` as "tp=1 -> 2, ..."; None
    when there are none or the checkpoint's optimizer state can be read in any layout."""
    if meta.get("optimizer_format") != "dp_reshardable" or meta.get("weights_only"):
        return None
    before = meta["config"]["parallel"]
    changed = [f"{k}={before[k]} -> {getattr(parallel, k)}" for k in ("tp", "pp", "vp")
               if before[k] != getattr(parallel, k)]
    return ", ".join(changed) or None


def _optional_on_load(key: str) -> bool:
    return key.endswith("_extra_state")  # Transformer Engine's FP8 metadata


def _load_module(module: torch.nn.Module, state: dict, path: Path) -> None:
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not _optional_on_load(k)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {path} does not fit the model: missing {missing[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}")


def write_state_dict(sd: dict[str, torch.Tensor], out: Path, metadata: Optional[dict] = None) -> None:
    """A consolidated single-file state dict (exports): safetensors for a .safetensors path
    (with string ``metadata``), torch.save otherwise."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(out), metadata=metadata)
    else:
        torch.save(sd, out)
    log.info("exported %d tensors (%.1fM parameters) to %s", len(sd),
             sum(v.numel() for v in sd.values()) / 1e6, out)


# --------------------------------------------------------------------------- optimizer step count

# Adam's step count lives in one of two places, depending on the class megatron-core picked:
# torch Adam/AdamW (no TE, no apex) keep it per parameter (state[p]["step"], a tensor); TE's and
# apex's FusedAdam keep it per param group (group["step"], an int) and refuse any per-parameter
# key besides exp_avg, exp_avg_sq and master_param on load (KeyError 'step').

def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def keeps_step_per_parameter(torch_optimizer) -> bool:
    """True when this torch optimizer keeps Adam's step in each parameter's state, False when
    in its param groups, read from the optimizer's own state. One that has not stepped yet holds
    neither: torch's Adam family is the one that creates a per-parameter step; any other class
    gets no per-parameter key it might refuse."""
    if any("step" in state for state in torch_optimizer.state.values()):
        return True
    if any("step" in group for group in torch_optimizer.param_groups):
        return False
    return isinstance(torch_optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _is_distributed_optimizer(megatron_optimizer) -> bool:
    return hasattr(megatron_optimizer, "_init_optimizer_states_with_dummy_values")


def _prepare_optimizer_for_load(optimizer) -> None:
    """Work around megatron-core 0.16's distributed-optimizer load with torch AdamW (the
    fallback when neither TE nor apex is installed; FACTS, bug 2).

    A fresh optimizer has no Adam state yet, so it gets dummy states of the right shapes first
    (one dummy step, which also shows where this optimizer keeps its step count). The fully
    reshardable loader then copies every state key of the destination from the checkpoint, but
    torch AdamW's per-param ``step`` is restored separately and is not in the source: copy the
    other keys and leave ``step`` to that separate path. An optimizer that keeps its step in the
    param groups (FusedAdam) needs no such help.
    """
    for opt in _inner_optimizers(optimizer):
        if not _is_distributed_optimizer(opt):
            continue
        opt._init_optimizer_states_with_dummy_values()
        if opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8 or \
                getattr(opt, "_aim_step_patch", False) or not keeps_step_per_parameter(opt.optimizer):
            continue
        original = opt._set_main_param_and_optimizer_states

        def set_states_without_step(model_param, tensors, _opt=opt, _original=original):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            state = _opt.optimizer.state[main_param]
            step = state.pop("step", None)
            try:
                _original(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        opt._set_main_param_and_optimizer_states = set_states_without_step
        opt._aim_step_patch = True


def _place_adam_step(optimizer, loaded: Any) -> None:
    """Put the saved step count where each inner optimizer keeps it, before megatron loads it.

    megatron-core 0.16's non-distributed optimizers save a per-parameter step once for all
    parameters (``state["common_step"]``) and leave it out when it is 0 (``if step:``), and
    restore it into every parameter's state on load; a group step is saved with the param
    groups. So:

    - per-parameter keepers (torch AdamW) get ``step`` in every saved parameter state that lacks
      it: the common step if saved, else a group step (a checkpoint written under FusedAdam),
      else 0 (written at step 0, when megatron dropped it);
    - per-group keepers (FusedAdam) get no per-parameter ``step``: a common step (a checkpoint
      written under torch AdamW) moves into the param groups instead.

    Saved param groups lacking one of this optimizer's hyperparameters get its default.

    The distributed optimizer moves the step between param groups and parameter states itself
    (megatron's ``DistributedOptimizer.load_state_dict``), so its state is left as saved.
    """
    inner = _inner_optimizers(optimizer)
    parts = [loaded] if len(inner) == 1 else [loaded[i] for i in range(len(inner))]
    for opt, part in zip(inner, parts):
        if _is_distributed_optimizer(opt) or getattr(opt, "optimizer", None) is None:
            continue
        saved = part["optimizer"] if "optimizer" in part else part  # mixed precision / fp32 wrapper
        param_states, groups = saved["state"], saved["param_groups"]
        # torch's load replaces each group by the saved one: hyperparameters the saving class did
        # not have (FusedAdam's bias_correction after torch AdamW) come from this one's defaults.
        for group in groups:
            for key, value in opt.optimizer.defaults.items():
                group.setdefault(key, value)
        common_step = param_states.pop("common_step", None)
        group_steps = [group["step"] for group in groups if "step" in group]
        if keeps_step_per_parameter(opt.optimizer):
            if common_step is not None:
                param_states["common_step"] = common_step  # megatron restores it per parameter
                continue
            step = float(group_steps[0]) if group_steps else 0.0
            for state in param_states.values():
                if "exp_avg" in state and "step" not in state:
                    state["step"] = torch.tensor(step)
        else:
            for state in param_states.values():
                state.pop("step", None)
            if common_step is not None and not group_steps:
                for group in groups:
                    group["step"] = int(common_step)


def _unshare_adam_step(optimizer) -> None:
    # After loading, megatron-core 0.16 can leave one `step` tensor shared by all params, which
    # torch AdamW then increments once per param per step: give each param its own copy.
    # Optimizers that keep the step in their param groups have no per-param step to copy.
    for opt in _inner_optimizers(optimizer):
        torch_opt = getattr(opt, "optimizer", None)
        if torch_opt is None:
            continue
        for param_state in torch_opt.state.values():
            step = param_state.get("step")
            if torch.is_tensor(step):
                param_state["step"] = step.clone()
