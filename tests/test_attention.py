"""Prefix-causal attention kernels against the dense-mask reference (aim_megatron/models/attention.py).

On CPU the varlen kernel runs the same packing as on a GPU with a per-segment SDPA in place of
flash attention, so forward and backward of the packing are checked here; the GPU kernels
themselves are checked in tests/test_gpu.py when a GPU is present."""
import pytest
import torch
import torch.nn.functional as F

from aim_megatron.models import attention
from aim_megatron.models.attention import (PrefixCausalAttention, flex_prefix_causal, prefix_causal_allowed,
                                    resolve_kernel, varlen_plan, varlen_prefix_causal)
from aim_megatron.config import load_config
from aim_megatron.models.aim import transformer_configs
from conftest import TINY

# Edge cases: empty prefix, prefix 1, all but one, whole sequence, and values in between.
PREFIX = torch.tensor([0, 1, 7, 15, 16, 3])
S, H, D = 16, 3, 8


def qkv(dtype=torch.float64, grad=True, layout="bshd"):
    g = torch.Generator().manual_seed(0)
    shape = (len(PREFIX), S, H, D) if layout == "bshd" else (len(PREFIX), H, S, D)
    return [torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def masked_reference(q, k, v):
    """[b, s, h, d] in and out; one SDPA call with the dense mask."""
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                         attn_mask=prefix_causal_allowed(PREFIX, S))
    return out.transpose(1, 2)


def test_varlen_plan_packs_each_group_in_order():
    plan = varlen_plan(PREFIX, S)
    total_prefix = int(PREFIX.sum())
    expected_prefix = [b * S + i for b, k in enumerate(PREFIX.tolist()) for i in range(k)]
    expected_other = [b * S + i for b, k in enumerate(PREFIX.tolist()) for i in range(k, S)]
    assert plan["prefix_first"][:total_prefix].tolist() == expected_prefix
    assert plan["other_first"][:len(expected_other)].tolist() == expected_other
    assert plan["cu_prefix"].tolist() == [0, *torch.cumsum(PREFIX, 0).tolist()]
    assert plan["cu_other"].tolist() == [0, *torch.cumsum(S - PREFIX, 0).tolist()]
    idx = torch.arange(len(PREFIX) * S)
    assert torch.equal(plan["prefix_first"][plan["prefix_back"]], idx)
    assert torch.equal(plan["other_first"][plan["other_back"]], idx)


def test_varlen_equals_dense_mask_forward_and_backward():
    q, k, v = qkv()
    out, ref = varlen_prefix_causal(q, k, v, PREFIX), masked_reference(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class PoisonedVarlen(torch.autograd.Function):
    """The reference varlen call, but like flash attention it leaves rows past cu_seqlens[-1]
    unwritten, in its output and in its input gradients: here they are NaN."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, causal):
        ctx.save_for_backward(q, k, v, cu_q, cu_k)
        ctx.causal = causal
        out = attention.varlen_reference(q, k, v, cu_q, cu_k, S, S, causal).clone()
        out[int(cu_q[-1]):] = float("nan")
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, cu_q, cu_k = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (q, k, v)]
            out = attention.varlen_reference(*inputs, cu_q, cu_k, S, S, ctx.causal)
            dq, dk, dv = torch.autograd.grad(out, inputs, grad.nan_to_num())
        dq, dk, dv = dq.clone(), dk.clone(), dv.clone()
        dq[int(cu_q[-1]):] = float("nan")
        dk[int(cu_k[-1]):] = float("nan")
        dv[int(cu_k[-1]):] = float("nan")
        return dq, dk, dv, None, None, None


def test_varlen_ignores_rows_past_the_packed_total():
    """Rows a flash kernel leaves unwritten (output and input gradients) must not leak."""
    def poisoned(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale=None):
        return PoisonedVarlen.apply(q, k, v, cu_q, cu_k, causal)

    q, k, v = qkv()
    out, ref = varlen_prefix_causal(q, k, v, PREFIX, kernel=poisoned), masked_reference(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("api", ["torch-2.9", "torch-2.10+"])
def test_flash_varlen_call_adapts_to_the_torch_release(api, monkeypatch):
    """The flash call spells causal and scale as the installed torch's varlen_attn takes them
    (2.9: is_causal and no scale; later: window_size and scale); a stand-in with each signature
    runs the CPU reference, and the whole prefix-causal attention must match the dense mask."""
    calls = []

    def as_reference(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        calls.append((causal, scale))
        return attention.varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)

    if api == "torch-2.9":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            return as_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1)):
            assert window_size in ((-1, -1), (-1, 0))
            return as_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), scale)

    newer = api == "torch-2.10+"
    monkeypatch.setattr(attention, "_varlen_api", lambda: (varlen_attn, newer, newer))
    q, k, v = qkv()
    out = varlen_prefix_causal(q, k, v, PREFIX, kernel=attention._flash_varlen)
    torch.testing.assert_close(out, masked_reference(q, k, v), rtol=1e-12, atol=1e-12)
    assert calls == [(False, None), (True, None)]
    # The default scale 1/sqrt(d) works everywhere; another one only where torch takes it.
    out = varlen_prefix_causal(q, k, v, PREFIX, scale=D ** -0.5, kernel=attention._flash_varlen)
    torch.testing.assert_close(out, masked_reference(q, k, v), rtol=1e-12, atol=1e-12)
    if api == "torch-2.9":
        with pytest.raises(RuntimeError, match="needs torch>=2.10"):
            varlen_prefix_causal(q, k, v, PREFIX, scale=0.5, kernel=attention._flash_varlen)
    else:
        out = varlen_prefix_causal(q, k, v, PREFIX, scale=0.5, kernel=attention._flash_varlen)
        assert calls[-1] == (True, 0.5)


def test_installed_torch_varlen_signature_is_known():
    """The installed torch's varlen_attn has one of the two signatures _flash_varlen speaks."""
    fn, has_window, has_scale = attention._varlen_api()
    import inspect
    params = inspect.signature(fn).parameters
    assert (has_window and has_scale) or ("is_causal" in params and not has_scale)


def test_varlen_negative_control():
    """A purely causal split (prefix treated as length 1) differs, so the checks above can fail."""
    q, k, v = qkv(grad=False)
    wrong = varlen_prefix_causal(q, k, v, torch.ones_like(PREFIX))
    assert (wrong - masked_reference(q, k, v)).abs().max() > 1e-3


def test_flex_forward_equals_dense_mask():
    q, k, v = qkv(dtype=torch.float32, grad=False, layout="bhsd")
    out = flex_prefix_causal(q, k, v, PREFIX)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=prefix_causal_allowed(PREFIX, S))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_compiled_flex_is_compiled_once_for_all_micro_batches():
    """The GPU path runs FlexAttention through torch.compile with a new block mask (a new closure
    over a new prefix-length tensor) every micro-batch: that must reuse one compiled graph, not
    recompile per micro-batch (dynamo would give up after its recompile limit and run unfused).
    Compiled here on CPU, forward only; the guards are the same on a GPU."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    q, k, v = qkv(dtype=torch.float32, grad=False, layout="bhsd")
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        prefix = torch.randint(0, S + 1, (len(PREFIX),), generator=g)
        block_mask = attention._flex_block_mask(prefix, S)
        with torch.no_grad():
            out = attention._compiled_flex()(q, k, v, block_mask=block_mask)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=prefix_causal_allowed(prefix, S))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_flex_backward_on_cpu_is_a_clear_error():
    q, k, v = qkv(dtype=torch.float32, layout="bhsd")
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        flex_prefix_causal(q, k, v, PREFIX)


def test_kernel_selection(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_kernel("auto", cpu, torch.bfloat16) == "masked"
    assert resolve_kernel("varlen", cpu, torch.float32) == "varlen"   # the CPU reference
    monkeypatch.setattr(attention, "flash_varlen_available", lambda: True)
    assert resolve_kernel("auto", gpu, torch.bfloat16) == "varlen"
    assert resolve_kernel("auto", gpu, torch.float32) == "masked"   # flash needs half precision
    with pytest.raises(RuntimeError, match="params_dtype=bf16"):
        resolve_kernel("varlen", gpu, torch.float32)
    monkeypatch.setattr(attention, "flash_varlen_available", lambda: False)
    assert resolve_kernel("auto", gpu, torch.bfloat16) == "masked"
    with pytest.raises(ValueError, match="choose one of"):
        resolve_kernel("flash", cpu, torch.float32)


@pytest.mark.parametrize("kernel", ["varlen", "masked"])
def test_core_attention_module_layouts(kernel):
    """The megatron-facing module: [s, b, h, d] in, [s, b, h*d] out; None = bidirectional."""
    cfg = load_config(None, TINY)
    trunk_config, _ = transformer_configs(cfg)
    module = PrefixCausalAttention(trunk_config, 1, None, "self", kernel=kernel)
    q, k, v = qkv()
    sbhd = [t.transpose(0, 1) for t in (q, k, v)]
    out = module(*sbhd, PREFIX)
    torch.testing.assert_close(out, masked_reference(q, k, v).transpose(0, 1).reshape(S, len(PREFIX), H * D))
    full = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(module(*sbhd, None), full.transpose(0, 1).reshape(S, len(PREFIX), H * D))
    with pytest.raises(TypeError, match="prefix lengths"):
        module(*sbhd, ~prefix_causal_allowed(PREFIX, S))


def test_cpu_half_precision_uses_the_math_path_and_matches_the_reference():
    """bf16 on CPU: short sequences run torch's math SDPA (the fused CPU kernel is 2-2.6x slower
    there, benchmarks/cpu_attention.py); forward and gradients still equal the float64 reference
    to bf16 precision, with the prefix-causal mask and bidirectionally."""
    cfg = load_config(None, TINY)
    trunk_config, _ = transformer_configs(cfg)
    module = PrefixCausalAttention(trunk_config, 1, None, "self", kernel="masked")
    q, k, v = qkv()
    ref = masked_reference(q, k, v)
    (ref * ref).sum().backward()
    ref_grads = [t.grad.clone() for t in (q, k, v)]
    half = [t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch._C._get_math_sdp_enabled() and not torch._C._get_flash_sdp_enabled())
        return real_sdpa(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention.F, "scaled_dot_product_attention", spy)
        out = module(*(t.transpose(0, 1) for t in half), PREFIX).float()
    assert seen == [True]                                           # math only, flash off
    expected = ref.transpose(0, 1).reshape(S, len(PREFIX), H * D).float()
    torch.testing.assert_close(out, expected, rtol=0.02, atol=0.02)
    (out * out).sum().backward()
    for got, want in zip(half, ref_grads):
        torch.testing.assert_close(got.grad.float(), want.float(), rtol=0.05, atol=0.05)
    long_q = torch.zeros(1, H, attention.CPU_HALF_MATH_MAX_TOKENS + 1, D, dtype=torch.bfloat16)
    for other in (q.detach().float().transpose(1, 2), long_q):      # fp32, or a long sequence
        with attention.sdpa_backend_context(other):
            assert torch._C._get_flash_sdp_enabled()               # torch's own choice


@pytest.mark.parametrize("kernel,cache", [("varlen", "_varlen_plan_once"), ("masked", "_dense_mask_once")])
def test_masks_are_built_once_per_micro_batch(kernel, cache, monkeypatch):
    """Every layer (4 here), forward and backward, shares one build per micro-batch; a new
    micro-batch, or the same tensor changed in place, rebuilds."""
    from aim_megatron.distributed import parallel
    once = getattr(attention, cache)
    builds = []
    original = once.build
    monkeypatch.setattr(once, "build", lambda p, s: builds.append(p.tolist()) or original(p, s))
    monkeypatch.setattr(once, "key", None)
    monkeypatch.setattr(once, "value", None)  # restored with key: later tests see no stale mask
    # On a GPU (make gpu-check) the model lives there, in bf16: flash varlen needs half precision.
    dtype = ["train.params_dtype=bf16"] if torch.cuda.is_available() else []
    cfg = load_config(None, [*TINY, "train.micro_batch_size=3", "train.global_batch_size=3",
                             f"model.attention_kernel={kernel}", *dtype])
    parallel.initialize(cfg)
    (model,) = parallel.build_model(cfg, wrap_ddp=False)
    device = next(model.parameters()).device
    m = cfg.model
    images = torch.randn(3, m.in_channels, m.image_size, m.image_size).to(device)
    prefix = torch.tensor([1, 5, 15], device=device)
    model(images, prefix).sum().backward()
    assert builds == [[1, 5, 15]]
    model(images, torch.tensor([1, 5, 15], device=device)).sum().backward()
    prefix[0] = 2
    model(images, prefix).sum().backward()
    assert builds == [[1, 5, 15], [1, 5, 15], [2, 5, 15]]


# --------------------------------------------------------------------------- run-time self-check

def top_left_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale=None):
    """A varlen kernel that aligns its causal mask top-left (query i of a segment sees keys
    j <= i) where flash attention aligns it bottom-right: the mistake the self-check must catch."""
    out = torch.zeros_like(q)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        if q1 == q0:
            continue
        qs, ks, vs = (t.transpose(0, 1) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        mask = None
        if causal:
            mask = torch.arange(k1 - k0)[None, :] <= torch.arange(q1 - q0)[:, None]
        seg = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        out[q0:q1] = seg.transpose(0, 1)
    return out


@pytest.mark.parametrize("kernel", ["varlen", "flex"])
def test_self_check_passes_a_correct_kernel(kernel):
    ok, reason = attention.kernel_matches_dense_mask(kernel, (4, S, H, D), torch.device("cpu"), torch.bfloat16)
    assert ok, reason
    assert "matches the dense mask" in reason


def test_self_check_catches_a_top_left_aligned_kernel(monkeypatch):
    monkeypatch.setattr(attention, "varlen_reference", top_left_varlen_reference)
    ok, reason = attention.kernel_matches_dense_mask("varlen", (4, S, H, D), torch.device("cpu"), torch.bfloat16)
    assert not ok
    assert "differs from the dense mask" in reason and "aligned top-left, not bottom-right" in reason


def test_self_check_reports_a_kernel_that_raises(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(attention, "varlen_reference", broken)
    ok, reason = attention.kernel_matches_dense_mask("varlen", (2, S, H, D), torch.device("cpu"), torch.bfloat16)
    assert not ok and "failed" in reason and "no kernel image" in reason


def test_a_wrong_kernel_falls_back_to_masked_loudly_and_is_recorded(monkeypatch, caplog):
    """End to end in the megatron-facing module: a varlen kernel with the wrong causal alignment
    is checked at the first call, replaced by the dense-mask path (whose output the module then
    returns), warned about, and recorded; the run's RNG and the per-micro-batch caches are
    untouched. CPU stands in for the GPU by adding it to the checked devices."""
    monkeypatch.setattr(attention, "SELF_CHECK_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(attention, "_kernel_decisions", {})
    monkeypatch.setattr(attention, "varlen_reference", top_left_varlen_reference)
    monkeypatch.setattr(attention._varlen_plan_once, "key", None)
    cfg = load_config(None, TINY)
    trunk_config, _ = transformer_configs(cfg)
    module = PrefixCausalAttention(trunk_config, 1, None, "self", kernel="varlen")
    q, k, v = qkv()
    sbhd = [t.transpose(0, 1) for t in (q, k, v)]
    rng = torch.get_rng_state()
    with pytest.warns(RuntimeWarning, match="self-check failed"):
        out = module(*sbhd, PREFIX)
    assert torch.equal(torch.get_rng_state(), rng)
    assert attention._varlen_plan_once.key is None            # the check built no cached plan
    torch.testing.assert_close(out, masked_reference(q, k, v).transpose(0, 1).reshape(S, len(PREFIX), H * D))
    assert any("ATTENTION KERNEL SELF-CHECK FAILED" in r.getMessage() for r in caplog.records)
    (record,) = attention.kernel_self_checks()
    assert record["requested"] == "varlen" and record["checked"] == "varlen"
    assert record["kernel"] == "masked" and not record["passed"]
    assert "top-left" in record["reason"] and "falling back to masked" in record["reason"]
    module(*sbhd, PREFIX)                                      # checked once per process
    assert len(attention.kernel_self_checks()) == 1


def test_a_correct_kernel_passes_the_check_and_is_used(monkeypatch):
    monkeypatch.setattr(attention, "SELF_CHECK_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(attention, "_kernel_decisions", {})
    kernel, reason = attention.choose_kernel("varlen", (len(PREFIX), S, H, D), torch.device("cpu"), torch.float64)
    assert kernel == "varlen" and "matches the dense mask" in reason
    (record,) = attention.kernel_self_checks()
    assert record["passed"] and record["kernel"] == "varlen"
    # masked needs no check; without the CPU in the checked devices nothing is checked on CPU
    assert attention.choose_kernel("masked", (1, S, H, D), torch.device("cpu"), torch.float32)[0] == "masked"
    monkeypatch.setattr(attention, "SELF_CHECK_DEVICES", ("cuda",))
    assert attention.choose_kernel("flex", (1, S, H, D), torch.device("cpu"), torch.float32)[0] == "flex"
    assert len(attention.kernel_self_checks()) == 1


def test_a_pre_release_varlen_signature_counts_as_unavailable(monkeypatch):
    """An early torch.nn.attention.varlen whose varlen_attn speaks neither known signature is
    reported (and auto then runs masked) instead of failing inside the call."""
    import torch.nn.attention as nn_attention
    import types

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal_alignment="top_left"):
        raise AssertionError("never called")

    monkeypatch.setitem(__import__("sys").modules, "torch.nn.attention.varlen",
                        types.SimpleNamespace(varlen_attn=varlen_attn))
    monkeypatch.setattr(nn_attention, "varlen", types.SimpleNamespace(varlen_attn=varlen_attn), raising=False)
    problem = attention.varlen_api_problem()
    assert problem is not None and "signature" in problem
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not attention.flash_varlen_available()
