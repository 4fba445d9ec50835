"""GPU-only paths: flash varlen and FlexAttention prefix-causal kernels, the Transformer Engine spec
and FP8. Skipped without CUDA (CI has none); run on a GPU machine with `pytest tests/test_gpu.py`
(or all GPU checks at once: `make gpu-check`). A kernel this torch lacks is a skip with the reason,
not a failure. Their selection logic and CPU fallbacks are tested in test_attention.py,
test_config.py and test_fp8_validation.py."""
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _varlen_problem():
    from aim_megatron.models.attention import flash_varlen_available, varlen_api_problem
    if flash_varlen_available():
        return None
    return varlen_api_problem() or "flash varlen attention needs an sm80+ GPU"


def _flex_problem():
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except Exception as exc:
        return f"torch {torch.__version__} has no FlexAttention ({type(exc).__name__})"
    return None


def _skip_unless_kernel(kernel):
    problem = {"varlen": _varlen_problem, "flex": _flex_problem}.get(kernel, lambda: None)()
    if problem:
        pytest.skip(problem)


def _te_available():
    from aim_megatron.models.aim import transformer_engine_available
    return transformer_engine_available()


def _qkv(b=8, s=256, h=4, d=128, dtype=torch.bfloat16, layout="bshd"):
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (b, s, h, d) if layout == "bshd" else (b, h, s, d)
    return [torch.randn(*shape, generator=g, device="cuda", dtype=dtype).requires_grad_() for _ in range(3)]


def _prefix(b=8, s=256):
    return torch.tensor([1, s - 1, 17, 128, 129, 200, 5, 255][:b], device="cuda")


def _dense(q, k, v, prefix, layout="bshd"):
    from aim_megatron.models.attention import prefix_causal_allowed
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                         attn_mask=prefix_causal_allowed(prefix, q.shape[2]))
    return out.transpose(1, 2) if layout == "bshd" else out


def _check(out, ref, inputs):
    # bf16 kernels against an fp32 reference: compare at bf16 resolution, relative to scale.
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out.float(), inputs, g)
    want = torch.autograd.grad(ref, inputs, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


def test_flash_varlen_matches_dense_mask():
    from aim_megatron.models.attention import varlen_prefix_causal
    _skip_unless_kernel("varlen")
    q, k, v = _qkv()
    prefix = _prefix()
    _check(varlen_prefix_causal(q, k, v, prefix), _dense(q, k, v, prefix), (q, k, v))


def test_flex_matches_dense_mask():
    from aim_megatron.models.attention import flex_prefix_causal
    _skip_unless_kernel("flex")
    q, k, v = _qkv(layout="bhsd")
    prefix = _prefix()
    _check(flex_prefix_causal(q, k, v, prefix), _dense(q, k, v, prefix, "bhsd"), (q, k, v))


def _build(overrides, wrap_ddp=False):
    from aim_megatron.distributed import parallel
    from aim_megatron.config import load_config
    cfg = load_config(None, [*TINY, "model.hidden_size=256", "model.num_heads=2",
                             "train.micro_batch_size=8", "train.global_batch_size=8",
                             "train.params_dtype=bf16", *overrides])
    parallel.initialize(cfg)
    return cfg, parallel.build_model(cfg, wrap_ddp=wrap_ddp)


def _loss(cfg, model, seed=0):
    from aim_megatron.models.aim import loss_mask
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    images = torch.randn(8, m.in_channels, m.image_size, m.image_size, generator=g).cuda()
    prefix = torch.randint(1, m.num_patches, (8,), generator=g).cuda()
    mask = loss_mask(prefix, m.num_patches)
    return (model[0](images, prefix).float() * mask).sum() / mask.sum()


@pytest.mark.parametrize("kernel", ["varlen", "flex"])
def test_model_kernels_match_dense_mask(kernel):
    from aim_megatron.distributed import parallel
    _skip_unless_kernel(kernel)
    cfg, dense = _build(["model.backend=local", "model.attention_kernel=masked"])
    full = parallel.gather_full_state_dict(dense)
    cfg2, fused = _build(["model.backend=local", f"model.attention_kernel={kernel}"])
    parallel.load_full_state_dict(fused, full)
    a, b = _loss(cfg, dense), _loss(cfg2, fused)
    assert abs(a.item() - b.item()) < 1e-2 * abs(a.item())


@pytest.mark.parametrize("kernel", ["varlen", "flex"])
def test_fused_kernels_pass_the_run_time_self_check(kernel):
    """The check a run does at its first attention call, at AIM-600M's attention shape: the
    kernel matches the dense mask in bf16 (a failure here would make every run fall back to
    masked, loudly)."""
    from aim_megatron.models import attention
    _skip_unless_kernel(kernel)
    ok, reason = attention.kernel_matches_dense_mask(kernel, (8, 256, 12, 128), torch.device("cuda"),
                                                     torch.bfloat16)
    assert ok, reason


@pytest.mark.skipif(not _te_available(), reason="needs Transformer Engine")
def test_te_spec_matches_local_spec():
    from aim_megatron.distributed import parallel
    cfg, local = _build(["model.backend=local"])
    full = parallel.gather_full_state_dict(local)
    cfg2, te = _build(["model.backend=te"])
    parallel.load_full_state_dict(te, full)
    assert type(te[0].trunk.layers[0].self_attention.linear_qkv).__name__ == "TELayerNormColumnParallelLinear"
    a, b = _loss(cfg, local), _loss(cfg2, te)
    assert abs(a.item() - b.item()) < 1e-2 * abs(a.item())


@pytest.mark.skipif(not _te_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs Transformer Engine on an FP8 GPU")
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_tracks_bf16(recipe):
    """A few optimizer steps on the same batches: FP8 losses stay within a few % of bf16 and fall."""
    from aim_megatron.distributed import parallel
    curves = {}
    for precision in ("bf16", "fp8"):
        extra = ["train.fp8=hybrid", f"train.fp8_recipe={recipe}"] if precision == "fp8" else []
        cfg, model = _build(["model.backend=te", "train.lr=1e-3", "train.scale_lr=false",
                             "train.warmup_fraction=0", *extra], wrap_ddp=True)
        optimizer = parallel.build_optimizer(cfg, model)
        g = torch.Generator().manual_seed(0)
        m = cfg.model
        batches = [[{"images": torch.randn(8, m.in_channels, m.image_size, m.image_size, generator=g).cuda(),
                     "prefix_len": torch.randint(1, m.num_patches, (8,), generator=g).cuda()}]
                   for _ in range(2)]
        curves[precision] = [parallel.train_step(cfg, model, optimizer, batches[step % 2])[0]
                             for step in range(8)]
    assert curves["fp8"][-1] < curves["fp8"][0]
    for a, b in zip(curves["fp8"], curves["bf16"]):
        assert abs(a - b) < 0.05 * abs(b), curves
