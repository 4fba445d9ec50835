"""Prefix-causal self-attention without the arbitrary-mask path.

AIM's mask for a sample with prefix length k: query q may attend key j if j < k or j <= q.
It is the union of two shapes that fused kernels support natively:

    prefix queries  q <  k : every key j < k     -> no mask, k queries over k keys
    other queries   q >= k : every key j <= q    -> causal aligned bottom-right, N-k queries over N keys

Kernels (``model.attention_kernel``):

    varlen  both parts as packed variable-length sequences (cu_seqlens) in flash attention
            (torch.nn.attention.varlen); exact FLOPs, no [s, s] mask, no host sync. Without CUDA a
            per-segment SDPA reference of the same call runs, so the packing is tested on CPU.
    flex    one FlexAttention call with a block mask built from the prefix lengths (CUDA; torch has
            no FlexAttention backward on CPU, so CPU tests cover its forward only).
    masked  one SDPA call with the dense [b, 1, s, s] mask: the arbitrary-mask path, and the reference.
    auto    varlen on a GPU with flash attention in bf16/fp16, masked otherwise.

On a GPU a fused kernel is trusted only after it matched the dense mask once per process, on a
random batch of the first call's shape (``choose_kernel``): one that differs, or fails, is
replaced by masked with a loud warning, and ``kernel_self_checks()`` records why for the metrics.

The model hands the core attention the per-sample prefix lengths ([b] integer tensor) in place of a
mask (megatron passes ``attention_mask`` through untouched; a tensor survives recomputation), or None
for full bidirectional attention, which every kernel runs as one unmasked SDPA call.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from aim_megatron.config import ATTENTION_KERNELS

log = logging.getLogger(__name__)


def check_kernel(kernel: str) -> None:
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"model.attention_kernel={kernel!r}; choose one of {', '.join(ATTENTION_KERNELS)}")


def prefix_causal_allowed(prefix_len: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[b, 1, s, s] bool, True = query may attend key (torch SDPA's convention)."""
    idx = torch.arange(seq_len, device=prefix_len.device)
    q, k = idx[:, None], idx[None, :]
    return ((k[None] < prefix_len[:, None, None]) | (k <= q)[None]).unsqueeze(1)


def flash_varlen_available() -> bool:
    if not torch.cuda.is_available():
        return False
    return varlen_api_problem() is None and torch.cuda.get_device_capability() >= (8, 0)


def varlen_api_problem() -> Optional[str]:
    """Why torch's flash varlen call cannot be used here, or None: missing (torch < 2.9) or a
    pre-release whose signature is neither 2.9's (is_causal) nor the later one (window_size)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as exc:  # ImportError before 2.9; anything else from a broken build
        return f"torch {torch.__version__} has no torch.nn.attention.varlen ({type(exc).__name__}); needs torch>=2.9"
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" not in params and "window_size" not in params:
        return (f"torch {torch.__version__}'s varlen_attn{inspect.signature(varlen_attn)} is a signature "
                f"this code does not know (neither is_causal nor window_size)")
    return None


def resolve_kernel(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel a call runs. Explicit requests that cannot run here fail with the fix."""
    check_kernel(requested)
    half = dtype in (torch.bfloat16, torch.float16)
    if requested == "auto":
        return "varlen" if device.type == "cuda" and half and flash_varlen_available() else "masked"
    if requested == "varlen" and device.type == "cuda" and not (half and flash_varlen_available()):
        raise RuntimeError("model.attention_kernel=varlen on a GPU needs flash attention "
                           "(torch>=2.9, sm80+) and bf16/fp16 activations (train.params_dtype=bf16); "
                           "set model.attention_kernel=auto or masked")
    return requested


# On CPU in bf16/fp16, torch's fused (flash) SDPA kernel is 2-2.6x slower than its math path for
# short sequences (fwd+bwd, 49-100 tokens, head dim 32-64; even at 196, slower from 256 tokens:
# benchmarks/cpu_attention.py). CPU runs of AIM are the demo and tests, so short sequences it is.
CPU_HALF_MATH_MAX_TOKENS = 128


def sdpa_backend_context(q: torch.Tensor):
    """torch's math SDPA path for short half-precision sequences on CPU (``q``: [b, h, s, d]);
    torch's own choice of kernel everywhere else."""
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[-2] <= CPU_HALF_MATH_MAX_TOKENS):
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _log_once(message: str, level: int = logging.WARNING) -> None:
    log.log(level, message)


class _PerMicroBatch:
    """Masks and index maps depend only on the micro-batch's prefix lengths, which megatron hands
    every layer (and its recomputation) as the same tensor: build them once, not once per layer.
    One entry, keyed by that tensor's identity and version; a new micro-batch rebuilds."""

    def __init__(self, build):
        self.build, self.key, self.value = build, None, None

    def __call__(self, prefix_len: torch.Tensor, seq_len: int):
        key = (prefix_len, prefix_len._version, seq_len)
        if self.key is None or self.key[0] is not prefix_len or self.key[1:] != key[1:]:
            self.key, self.value = key, self.build(prefix_len, seq_len)  # holds prefix_len: id stays unique
        return self.value


_dense_mask_once = _PerMicroBatch(prefix_causal_allowed)


# --------------------------------------------------------------------------- varlen (two packed calls)

def varlen_plan(prefix_len: torch.Tensor, seq_len: int) -> dict:
    """Index maps that pack each sample's prefix queries, and its other queries, into contiguous
    variable-length sequences. Fixed sizes (b*s) and device-side ops only: no host sync."""
    b, s, dev = prefix_len.numel(), seq_len, prefix_len.device
    flat = torch.arange(b * s, device=dev).view(b, s)
    is_prefix = torch.arange(s, device=dev)[None, :] < prefix_len[:, None]
    # Stable orders that put one group first and keep (sample, position) order inside each group.
    prefix_first = torch.argsort(torch.where(is_prefix, flat, flat + b * s).flatten())
    other_first = torch.argsort(torch.where(is_prefix, flat + b * s, flat).flatten())
    zero = torch.zeros(1, dtype=torch.int32, device=dev)
    plen = prefix_len.to(torch.int32)
    return dict(
        is_prefix=is_prefix.flatten(),
        prefix_first=prefix_first, prefix_back=torch.argsort(prefix_first),
        other_first=other_first, other_back=torch.argsort(other_first),
        cu_prefix=torch.cat([zero, torch.cumsum(plen, 0, dtype=torch.int32)]),
        cu_other=torch.cat([zero, torch.cumsum(s - plen, 0, dtype=torch.int32)]),
        cu_full=torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=dev),
    )


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool, scale=None):
    """What flash attention's varlen call computes, one segment at a time with SDPA: [t, h, d]
    packed rows, causal aligned bottom-right. Rows past cu_q[-1] are left zero."""
    out = torch.zeros_like(q)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        if q1 == q0:
            continue
        qs, ks, vs = (t.transpose(0, 1) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))  # [h, l, d]
        mask = None
        if causal:
            lq, lk = q1 - q0, k1 - k0
            mask = (torch.arange(lk, device=q.device)[None, :]
                    <= torch.arange(lq, device=q.device)[:, None] + (lk - lq))
        seg = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        out = out.index_copy(0, torch.arange(q0, q1, device=q.device), seg.transpose(0, 1))
    return out


@functools.lru_cache(maxsize=1)
def _varlen_api():
    """torch's varlen_attn and which keywords it takes: torch 2.9 has ``is_causal`` and no
    ``scale``; later releases have keyword-only ``scale`` and ``window_size`` instead."""
    from torch.nn.attention.varlen import varlen_attn
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in params, "scale" in params


def _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool, scale=None):
    # Flash attention's causal mask aligns bottom-right when a segment has fewer queries than keys
    # (torch.nn.attention.bias relies on the same for causal_lower_right). Newer torch spells it
    # window (-1, 0), torch 2.9 is_causal=True.
    varlen_attn, has_window, has_scale = _varlen_api()
    kwargs = {"window_size": (-1, 0) if causal else (-1, -1)} if has_window else {"is_causal": causal}
    if scale is not None:
        if has_scale:
            kwargs["scale"] = scale
        elif abs(scale * q.shape[-1] ** 0.5 - 1) > 1e-6:
            raise RuntimeError(f"this torch's varlen_attn has no scale argument and uses 1/sqrt(head_dim); "
                               f"softmax scale {scale} needs torch>=2.10, or model.attention_kernel=masked")
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def varlen_prefix_causal(q, k, v, prefix_len, scale=None, kernel=None, plan=None):
    """q, k, v: [b, s, h, d]. Two variable-length calls whose rows are disjoint, merged back.
    ``plan``: varlen_plan(prefix_len, s), built (and cached per micro-batch) when None."""
    b, s, h, d = q.shape
    if kernel is None:
        kernel = _flash_varlen if q.is_cuda else varlen_reference
        if not q.is_cuda:
            _log_once("attention_kernel=varlen without CUDA runs a per-segment SDPA reference "
                      "(correct, slow): use it to test the packing, masked to train")
    plan = _varlen_plan_once(prefix_len, s) if plan is None else plan
    qf, kf, vf = (t.reshape(b * s, h, d) for t in (q, k, v))
    pf = plan["prefix_first"]
    # Each call gets all b*s rows (slicing to its packed total would need the total on the host);
    # the kernel leaves rows past cu_seqlens[-1] unwritten in its outputs and in its input
    # gradients. where() keeps those rows out of both directions: their gradients are dropped here
    # instead of being scattered onto real tokens.
    rows = torch.arange(b * s, device=q.device)[:, None, None]
    in_prefix_call, in_other_call = rows < plan["cu_prefix"][-1], rows < plan["cu_other"][-1]

    def only(valid, t):
        return torch.where(valid, t, torch.zeros((), dtype=t.dtype, device=t.device))

    # max lengths: s bounds every segment, so no host sync is needed to size the kernel grid.
    out_prefix = kernel(only(in_prefix_call, qf[pf]), only(in_prefix_call, kf[pf]),
                        only(in_prefix_call, vf[pf]), plan["cu_prefix"], plan["cu_prefix"], s, s,
                        causal=False, scale=scale)
    out_other = kernel(only(in_other_call, qf[plan["other_first"]]), kf, vf, plan["cu_other"],
                       plan["cu_full"], s, s, causal=True, scale=scale)
    # Rows past each call's packed total are never selected (and may be uninitialised): where().
    out = torch.where(plan["is_prefix"][:, None, None],
                      out_prefix[plan["prefix_back"]], out_other[plan["other_back"]])
    return out.view(b, s, h, d)


_varlen_plan_once = _PerMicroBatch(varlen_plan)


# --------------------------------------------------------------------------- flex

@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def _flex_block_mask(prefix_len: torch.Tensor, seq_len: int):
    from torch.nn.attention.flex_attention import create_block_mask

    def allowed(batch, head, q_idx, kv_idx):
        return (kv_idx < prefix_len[batch]) | (kv_idx <= q_idx)

    return create_block_mask(allowed, B=prefix_len.numel(), H=None, Q_LEN=seq_len, KV_LEN=seq_len,
                             device=prefix_len.device)


_flex_block_mask_once = _PerMicroBatch(_flex_block_mask)


def flex_prefix_causal(q, k, v, prefix_len, scale=None, block_mask=None):
    """q, k, v: [b, h, s, d]. One FlexAttention call; fully masked blocks are skipped.
    ``block_mask``: built from prefix_len (and cached per micro-batch) when None."""
    from torch.nn.attention.flex_attention import flex_attention
    if block_mask is None:
        block_mask = _flex_block_mask_once(prefix_len, q.shape[2])
    if q.is_cuda:
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("model.attention_kernel=flex has no backward on CPU (torch implements "
                           "FlexAttention's CPU path for inference only); use masked or varlen")
    with warnings.catch_warnings():  # CPU: torch's unfused reference, a test of the block mask
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


# --------------------------------------------------------------------------- run-time self-check

# A fused kernel must match the dense mask to this (bf16 resolution for O(1) outputs) before a
# run trusts it; wrong masking (e.g. a causal part aligned top-left) differs by O(1).
SELF_CHECK_TOLERANCE = 1e-2
# Devices whose fused kernels are checked: the GPU kernels. On CPU both run torch reference code.
SELF_CHECK_DEVICES = ("cuda",)
_kernel_decisions: dict[tuple, dict] = {}


def top_left_allowed(prefix_len: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The mask the two varlen calls compute when the kernel aligns causal top-left instead of
    bottom-right: query q >= k sees keys j <= q - k. [b, 1, s, s], for diagnosing a mismatch."""
    idx = torch.arange(seq_len, device=prefix_len.device)
    q, k, p = idx[:, None], idx[None, :], prefix_len[:, None, None]
    return (((q < p) & (k < p)) | ((q >= p) & (k <= q - p))).unsqueeze(1)


def _dense(q, k, v, allowed, scale):
    """fp32 SDPA with a boolean mask; q, k, v [b, h, s, d]."""
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed, scale=scale)


def kernel_matches_dense_mask(kernel: str, shape: tuple, device: torch.device, dtype: torch.dtype,
                              scale: Optional[float] = None) -> tuple[bool, str]:
    """Run ``kernel`` (varlen or flex) once on random q, k, v of ``shape`` ([b, s, h, d]) with
    prefix lengths spread over [0, s], and compare it with the fp32 dense-mask path.
    Returns (matches, reason). Uses its own generator: the run's RNG streams are not touched,
    and no per-micro-batch cache is used."""
    b, s, h, d = shape
    g = torch.Generator(device=device).manual_seed(1234)
    q, k, v = (torch.randn(b, s, h, d, generator=g, device=device, dtype=dtype) for _ in range(3))
    spread = [1, s // 3, s // 2, s - 1, 0, s]  # the edge cases first: 1 and s-1 split unevenly
    prefix = torch.tensor([min(max(spread[i % len(spread)], 0), s) for i in range(b)], device=device)
    bhsd = [t.transpose(1, 2) for t in (q, k, v)]
    try:
        with torch.no_grad():
            if kernel == "varlen":
                out = varlen_prefix_causal(q, k, v, prefix, scale, plan=varlen_plan(prefix, s)).transpose(1, 2)
            elif kernel == "flex":
                out = flex_prefix_causal(*bhsd, prefix, scale, block_mask=_flex_block_mask(prefix, s))
            else:
                raise ValueError(f"no self-check for kernel {kernel!r}")
            ref = _dense(*bhsd, prefix_causal_allowed(prefix, s), scale)
            diff = (out.float() - ref).abs()
            bound = SELF_CHECK_TOLERANCE * (1 + ref.abs())
            if bool((diff <= bound).all()):
                return True, (f"{kernel} matches the dense mask on a random {dtype} batch of shape "
                              f"{list(shape)} (max |diff| {diff.max().item():.1e} <= {SELF_CHECK_TOLERANCE:g})")
            top_left = (out.float() - _dense(*bhsd, top_left_allowed(prefix, s), scale)).abs()
            aligned = (" ; it matches a causal mask aligned top-left, not bottom-right"
                       if bool((top_left <= bound).all()) else "")
            return False, (f"{kernel} differs from the dense mask by up to {diff.max().item():.3g} "
                           f"(> {SELF_CHECK_TOLERANCE:g}) on a random {dtype} batch of shape {list(shape)}{aligned}")
    except Exception as exc:  # a kernel that cannot run here is as unusable as a wrong one
        return False, f"{kernel} failed on a random {dtype} batch of shape {list(shape)}: {type(exc).__name__}: {exc}"


def choose_kernel(requested: str, shape: tuple, device: torch.device, dtype: torch.dtype,
                  scale: Optional[float] = None) -> tuple[str, str]:
    """The kernel a call runs, and why. ``resolve_kernel`` picks it; on a GPU a fused pick is
    self-checked once per (kernel, device, dtype, head shape) and replaced by masked, with a
    loud warning, if it does not match the dense mask. ``shape`` is the call's [b, s, h, d]."""
    kernel = resolve_kernel(requested, device, dtype)
    if kernel == "masked" or device.type not in SELF_CHECK_DEVICES:
        return kernel, f"{kernel} (model.attention_kernel={requested}, {device.type}, no self-check needed)"
    key = (requested, kernel, str(device), dtype, tuple(shape[1:]), scale)
    if key not in _kernel_decisions:
        ok, reason = kernel_matches_dense_mask(kernel, shape, device, dtype, scale)
        chosen = kernel if ok else "masked"
        if not ok:
            reason = f"{reason}: falling back to masked (the dense-mask path)"
            log.warning("ATTENTION KERNEL SELF-CHECK FAILED: %s", reason)
            warnings.warn(f"attention kernel self-check failed: {reason}", RuntimeWarning, stacklevel=2)
        _kernel_decisions[key] = dict(requested=requested, checked=kernel, kernel=chosen, passed=ok,
                                      reason=reason, device=str(device), dtype=str(dtype).replace("torch.", ""))
    decision = _kernel_decisions[key]
    return decision["kernel"], decision["reason"]


def kernel_self_checks() -> list[dict]:
    """Every self-check this process ran: requested and checked kernel, the kernel used, whether
    it passed and why (a record for the run's metrics)."""
    return [dict(d) for d in _kernel_decisions.values()]


# --------------------------------------------------------------------------- megatron module

class PrefixCausalAttention(MegatronModule):
    """megatron-core core attention ([s, b, heads, d] in, [s, b, heads*d] out) for AIM.

    ``attention_mask`` is the per-sample prefix-length tensor [b] (None = bidirectional)."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type, attention_type,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 kernel: str = "auto", **_):
        super().__init__(config=config)
        check_kernel(kernel)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("AIM uses no attention dropout; the fused prefix-causal kernels "
                             "do not implement it")
        self.kernel = kernel
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        s, b, h, d = query.shape
        prefix_len = attention_mask
        if prefix_len is not None and prefix_len.dtype == torch.bool:
            raise TypeError("PrefixCausalAttention takes prefix lengths [b], not a dense mask")
        kernel = "masked"
        if prefix_len is not None:
            kernel, reason = choose_kernel(self.kernel, (b, s, h, d), query.device, query.dtype,
                                           self.softmax_scale)
            _log_once(f"prefix-causal attention kernel: {kernel} (model.attention_kernel={self.kernel}): "
                      f"{reason}", logging.INFO)
        if kernel == "varlen":
            out = varlen_prefix_causal(query.transpose(0, 1), key.transpose(0, 1),
                                       value.transpose(0, 1), prefix_len, self.softmax_scale)
            return out.transpose(0, 1).reshape(s, b, h * d)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        if kernel == "flex":
            out = flex_prefix_causal(q, k, v, prefix_len, self.softmax_scale)
        else:
            allowed = None if prefix_len is None else _dense_mask_once(prefix_len, s)
            with sdpa_backend_context(q):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
