"""megatron-core decorates its fusion kernels (bias-GELU, bias-dropout-add, ...) with
``torch.compile`` when ``megatron.core`` is imported. Compiling already waits for the first call,
but the decoration alone imports TorchDynamo and Inductor: 1.3 s of every process start on a
2-core CPU (``python -X importtime``), for kernels that our configs never call. Here the
decoration itself waits for the first call; what runs, and how it is compiled, is unchanged.

Installed as an import hook by ``aim_megatron/__init__.py`` (which must not import torch: the
trainer installs its signal handlers before torch loads)."""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys

JIT_MODULE = "megatron.core.jit"


def deferred(decorator):
    """``decorator`` applied to a function at its first call instead of at its definition."""
    def decorate(fn=None, **kwargs):
        if fn is None:  # used as @decorator(**kwargs)
            return lambda f: decorate(f, **kwargs)
        decorated = None

        @functools.wraps(fn)
        def call(*args, **kw):
            nonlocal decorated
            if decorated is None:
                decorated = decorator(fn, **kwargs)
            return decorated(*args, **kw)

        return call

    decorate.wrapped_decorator = decorator
    return decorate


class _JitFuserHook(importlib.abc.MetaPathFinder):
    """Finds megatron.core.jit through the other finders and wraps its ``jit_fuser`` once the
    module has run, before any fusion module imports it."""

    def find_spec(self, name, path, target=None):
        if name != JIT_MODULE:
            return None
        sys.meta_path.remove(self)  # once; and so that the lookup below finds the real module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            if callable(getattr(module, "jit_fuser", None)):
                module.jit_fuser = deferred(module.jit_fuser)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if JIT_MODULE not in sys.modules and not any(isinstance(f, _JitFuserHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _JitFuserHook())
