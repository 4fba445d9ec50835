"""The one place where megatron-core is taught to run without a GPU.

megatron-core 0.16 assumes CUDA in a handful of spots (``torch.cuda.current_device()``,
``device="cuda"`` literals, ``torch.cuda.synchronize()``, the CUDA RNG tracker, and
``Tensor.type() == 'torch.cuda.FloatTensor'`` checks). On a machine without CUDA we point
those spots at the CPU so that the *unchanged* megatron-core code paths (TP, SP, PP, VP,
DDP, the distributed optimizer, activation recomputation) run on gloo.

Nothing here is active when CUDA is available: ``install()`` returns immediately.
Model and training code never test for the CPU themselves; they call ``install()`` once
(``aim_megatron.parallel.initialize`` does) and use ``device()`` for new tensors.

Scope: only megatron-core modules listed in ``_PATCHED_MODULES`` see a CPU-flavoured
``torch``; the rest of the process sees the real one. The two process-wide patches
(``Tensor.cuda`` as a no-op and ``Tensor.type()`` reporting CUDA names) are only made
when CUDA is absent.
"""
from __future__ import annotations

import importlib
import logging
import types

import torch

log = logging.getLogger(__name__)

_INSTALLED = False

# megatron-core modules that hard-code CUDA in code paths we use.
_PATCHED_MODULES = (
    "megatron.core.utils",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.validation",
)

_FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange", "randn", "rand", "as_tensor",
              "empty_like", "zeros_like", "ones_like", "full_like")


def device() -> torch.device:
    """The device new tensors and models should live on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _to_cpu_device(dev):
    if dev is None:
        return None
    if isinstance(dev, int):
        return "cpu"
    if isinstance(dev, str) and dev.startswith("cuda"):
        return "cpu"
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return "cpu"
    return dev


def _cpu_factory(fn):
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    return wrapper


class _CudaOnCpu(types.SimpleNamespace):
    """Stands in for ``torch.cuda`` inside the patched megatron-core modules."""

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def get_rng_state(*args, **kwargs):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *args, **kwargs):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def device_count():
        return 0

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCpu(types.ModuleType):
    """Stands in for ``torch`` inside the patched modules: CUDA devices become the CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _cpu_rng_get(*args, **kwargs):
    return torch.get_rng_state()


def _cpu_rng_set(new_state, *args, **kwargs):
    torch.set_rng_state(new_state)


def _tensor_type_with_cuda_names(orig):
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = orig(self)
            # megatron-core checks `param.type() == 'torch.cuda.FloatTensor'`.
            return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
        return orig(self, dtype, non_blocking, **kwargs)

    return type_


def install() -> bool:
    """Patch megatron-core for CPU if (and only if) CUDA is unavailable. Idempotent.

    Returns True when the shims are active.
    """
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    fake_torch = _TorchOnCpu()
    for mod_name in _PATCHED_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:  # optional parts of megatron-core (e.g. checkpoint backends)
            continue
        if getattr(mod, "torch", None) is torch:
            mod.torch = fake_torch

    from megatron.core.tensor_parallel import random as mcore_random

    # The RNG tracker forks the "CUDA" generator; on CPU that is the CPU generator.
    mcore_random._get_cuda_rng_state = _cpu_rng_get
    mcore_random._set_cuda_rng_state = _cpu_rng_set

    # The fully parallel load's exchange allocates receive buffers with `init_data("cuda")`,
    # whose default factory is the real torch.empty bound at import time.
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    init_data = ShardedTensor.init_data
    ShardedTensor.init_data = lambda self, device, *args, **kwargs: init_data(
        self, _to_cpu_device(device), *args, **kwargs)

    # Process-wide, CPU-only: `.cuda()` stays on the CPU and `.type()` reports CUDA names.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _tensor_type_with_cuda_names(torch.Tensor.type)
    _INSTALLED = True
    log.info("megatron-core CPU shims installed (no CUDA device found)")
    return True
