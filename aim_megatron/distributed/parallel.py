"""Parallel setup in one place: process groups, model chunks wrapped in megatron DDP, the
optimizer, one training step through megatron-core's pipeline schedules, and the mapping
between a rank's shards and the full (unsharded) state dict.

The same code runs on 1 CPU process, N gloo processes (torchrun) and N GPUs (NCCL).
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import sys
from functools import partial
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import get_standard_config_overrides
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from aim_megatron.distributed import cpu_shims
from aim_megatron.config import Config, ConfigError, num_microbatches, torch_params_dtype, validate
from aim_megatron.models.aim import TE_NORM_KEYS, AIMModel, build_model_chunk, loss_mask, select_backend

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- process groups

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(cfg: Config, timeout_minutes: int = 30) -> int:
    """Start torch.distributed (torchrun env or a single local process), validate the layout,
    create megatron's TP/PP/DP groups and seed every RNG. Returns the world size."""
    cpu_shims.install()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        kwargs = {}
        if "RANK" not in os.environ:  # plain `python ...`: a world of one
            kwargs = dict(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    world = dist.get_world_size()
    validate(cfg, world)
    p = cfg.parallel
    try:
        select_backend(cfg.model.backend, cfg.train.fp8)  # fail at start, before any group exists
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from exc
    if p.batch_p2p_comm and p.vp and dist.get_backend() == "gloo":
        raise ConfigError(
            "parallel.batch_p2p_comm=true with a virtual pipeline on gloo pairs p2p messages wrongly "
            "(silently wrong gradients); set parallel.batch_p2p_comm=false on CPU/gloo")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vp,
    )
    seed_everything(cfg.train.seed)
    return world


def seed_everything(seed: int) -> None:
    # Megatron convention: pipeline stages get different streams, TP peers and DP replicas the
    # same one (so replicated parameters start identical); the tracker derives per-TP streams.
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def run_cli(prog: str, body: Callable[[], None], errors: tuple[type[BaseException], ...]) -> int:
    """Run a command's body: an expected error becomes one line on stderr and exit code 1, and
    the process groups are torn down either way."""
    try:
        body()
    except errors as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    finally:
        shutdown()
    return 0


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- model + optimizer

def build_model(cfg: Config, wrap_ddp: bool = True) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual stage), on the device, in megatron DDP."""
    backend = select_backend(cfg.model.backend, cfg.train.fp8)
    vp = cfg.parallel.vp
    chunks = [build_model_chunk(cfg, backend, vp_stage=i if vp else None) for i in range(vp or 1)]
    device = cpu_shims.device()
    chunks = [c.to(device) for c in chunks]
    if not wrap_ddp:
        return chunks
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        ddp = DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                      disable_bucketing=i > 0)
        ddp.broadcast_params()  # DP replicas start from identical weights
        wrapped.append(ddp)
    _configure_schedule_hooks(wrapped, cfg)
    return wrapped


def _configure_schedule_hooks(model: list[torch.nn.Module], cfg: Config) -> None:
    config = model[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    if cfg.parallel.overlap_grad_reduce:
        config.grad_sync_func = ([m.start_grad_sync for m in model] if len(model) > 1
                                 else model[0].start_grad_sync)
    if cfg.parallel.overlap_param_gather:
        config.param_sync_func = ([m.start_param_sync for m in model] if len(model) > 1
                                  else model[0].start_param_sync)


def finish_param_sync(cfg: Config, model: list[torch.nn.Module]) -> None:
    """With overlap_param_gather the distributed optimizer's updated shards are all-gathered
    lazily, in the next forward; complete that now (before a checkpoint, evaluation or export)."""
    if cfg.parallel.overlap_param_gather:
        for chunk in model:
            chunk.disable_forward_pre_hook(param_sync=True)
            chunk.enable_forward_pre_hook()


def build_optimizer(cfg: Config, model: list[torch.nn.Module]):
    """AdamW per the official recipe; no weight decay on biases and norms (1-D params)."""
    t = cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.effective_lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.params_dtype == "bf16",
        params_dtype=torch_params_dtype(t.params_dtype),
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model,
                                       config_overrides=get_standard_config_overrides(opt_config))
    model[0].config.grad_scale_func = optimizer.scale_loss
    return optimizer


# --------------------------------------------------------------------------- one step

def _loss_func(prefix_len: torch.Tensor, num_patches: int, errors: torch.Tensor):
    mask = loss_mask(prefix_len, num_patches)
    loss_sum = (errors * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), mask.sum()])}


def forward_step(data_iterator: Iterator[dict], model: AIMModel):
    batch = next(data_iterator)
    device = cpu_shims.device()
    images = batch["images"]  # None on pipeline middle stages, which read no images
    if images is not None:
        images = images.to(device, non_blocking=True)
    prefix_len = batch["prefix_len"].to(device, non_blocking=True)
    errors = model(images, prefix_len)
    return errors, partial(_loss_func, prefix_len, _unwrap(model).model_cfg.num_patches)


def forward_backward(cfg: Config, model: list[torch.nn.Module], microbatches: list[dict],
                     forward_only: bool = False) -> float:
    """Run forward (+ backward) over ``microbatches`` with megatron's schedule for this layout.
    Returns the mean loss over all non-prefix patches of the global batch, on every rank."""
    if not forward_only:
        for chunk in model:
            chunk.zero_grad_buffer()
    iterators = [iter(microbatches) for _ in model]  # each virtual stage walks the same batches
    m = cfg.model
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(microbatches),
        seq_length=m.num_patches,
        micro_batch_size=len(microbatches[0]["prefix_len"]),
        forward_only=forward_only,
    )
    return _reduce_loss(losses)


def _reduce_loss(losses: list[dict]) -> float:
    """Sum loss and token counts over micro-batches and DP replicas; share from the last stage."""
    total = torch.zeros(2, dtype=torch.float64, device=cpu_shims.device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in losses:
            total += item["loss"].double()
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    dist.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item()


def train_step(cfg: Config, model: list[torch.nn.Module], optimizer, microbatches: list[dict]):
    """One optimizer step. Returns (loss, grad_norm, update_successful)."""
    optimizer.zero_grad()
    loss = forward_backward(cfg, model, microbatches)
    ok, grad_norm, _ = optimizer.step()
    return loss, grad_norm, ok


def split_microbatches(cfg: Config, global_batch: dict, world_size: int) -> list[dict]:
    """This DP rank's micro-batches out of a global batch (all tensors indexed by sample)."""
    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    mbs = cfg.train.micro_batch_size
    n = num_microbatches(cfg, world_size)
    per_rank = mbs * n
    out = []
    for i in range(n):
        start = rank * per_rank + i * mbs
        out.append({k: v[start:start + mbs] for k, v in global_batch.items()})
    assert dp * per_rank == len(global_batch["images"]), "global batch size does not match config"
    return out


# --------------------------------------------------------------------------- full <-> sharded

_LAYER_RE = re.compile(r"^trunk\.layers\.(\d+)\.")
# Transformer Engine fuses the pre-norms into the next linear; full dicts use the local names.
_TE_TO_LOCAL = {te + p: local + p for local, te in TE_NORM_KEYS.items() for p in ("weight", "bias")}


def _unwrap(chunk: torch.nn.Module) -> AIMModel:
    while not isinstance(chunk, AIMModel):
        chunk = chunk.module
    return chunk


def named_global_parameters(model: Iterable[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(name in the full model, local parameter): trunk layer indices become global ones."""
    for chunk in model:
        chunk = _unwrap(chunk)
        for name, param in chunk.named_parameters():
            match = _LAYER_RE.match(name)
            if match:
                layer = chunk.trunk.layers[int(match.group(1))]
                name = f"trunk.layers.{layer.layer_number - 1}." + name[match.end():]
            for te_name, local_name in _TE_TO_LOCAL.items():
                if name.endswith(te_name):
                    name = name[: -len(te_name)] + local_name
            yield name, param


def _tp_slice(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    size = param.shape[dim]
    rank = parallel_state.get_tensor_model_parallel_rank()
    return full.narrow(dim, rank * size, size)


@torch.no_grad()
def load_full_state_dict(model: list[torch.nn.Module], full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shards out of a full (single-process layout) parameter dict."""
    for name, param in named_global_parameters(model):
        if name not in full:
            raise KeyError(f"parameter {name} missing from the full state dict")
        piece = _tp_slice(full[name], param)
        if piece.shape != param.shape:
            raise ValueError(f"{name}: full tensor gives shard {tuple(piece.shape)}, "
                             f"model has {tuple(param.shape)}")
        param.copy_(piece)


def gather_full_state_dict(model: list[torch.nn.Module],
                           tensor_of: Callable[[torch.nn.Parameter], Optional[torch.Tensor]] = lambda p: p
                           ) -> dict[str, torch.Tensor]:
    """Assemble the full dict of ``tensor_of(param)`` (weights by default, e.g. ``main_grad``)
    on every rank. Uses object collectives: meant for tests, tools and small models."""
    pieces = {}
    if parallel_state.get_data_parallel_rank() == 0:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        for name, param in named_global_parameters(model):
            t = tensor_of(param)
            if t is None:
                continue
            dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
            pieces[(name, tp_rank)] = (t.detach().float().cpu().view(param.shape).clone(), dim)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pieces)
    merged: dict = {}
    for part in gathered:
        merged.update(part)
    full = {}
    for name in sorted({n for n, _ in merged}):
        ranks = sorted(r for n, r in merged if n == name)
        tensors = [merged[(name, r)][0] for r in ranks]
        dim = merged[(name, ranks[0])][1]
        full[name] = torch.cat(tensors, dim=dim) if dim is not None else tensors[0]
    return full
