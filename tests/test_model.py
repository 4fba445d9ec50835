"""Single-process checks of the AIM model: against a plain-PyTorch reference written from the
architecture description, the attention against torch SDPA, the prefix-causal mask and loss
semantics, and the official presets' parameter counts."""
import math

import pytest
import torch
import torch.nn.functional as F

from aim_megatron.distributed import parallel
from aim_megatron.config import PRESETS, load_config
from aim_megatron.models.attention import prefix_causal_allowed
from aim_megatron.models.aim import (loss_mask, normalized_targets, patchify, sincos_2d, transformer_configs, AIMModel, select_backend)
from aim_megatron.checkpoint.official import megatron_to_reference, reference_to_megatron
from aim_megatron.models.reference import ReferenceAIM
from conftest import TINY


def build(overrides=()):
    cfg = load_config(None, [*TINY, "train.micro_batch_size=4", "train.global_batch_size=4",
                             *overrides])
    parallel.initialize(cfg)
    (model,) = parallel.build_model(cfg, wrap_ddp=False)
    return cfg, model


def batch(cfg, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    images = torch.randn(n, m.in_channels, m.image_size, m.image_size, generator=g)
    lo, hi = m.prefix_range
    return images, torch.randint(lo, hi + 1, (n,), generator=g)


def masked_mean(errors, prefix_len, n):
    mask = loss_mask(prefix_len, n)
    return (errors * mask).sum() / mask.sum()


def test_megatron_model_matches_plain_pytorch_reference():
    cfg, model = build()
    ref = ReferenceAIM(cfg.model)
    full = parallel.gather_full_state_dict([model])
    ref.load_state_dict(megatron_to_reference(full, cfg.model))
    images, prefix = batch(cfg)

    ours = model(images, prefix)
    theirs = ref(images, prefix)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # Bidirectional (evaluation) attention too.
    torch.testing.assert_close(model(images, None), ref(images, None), rtol=1e-5, atol=1e-6)

    n = cfg.model.num_patches
    masked_mean(ours, prefix, n).backward()
    masked_mean(theirs, prefix, n).backward()
    our_grads = parallel.gather_full_state_dict([model], lambda p: p.grad)
    ref_grads = reference_to_megatron({k: p.grad for k, p in ref.named_parameters()}, cfg.model)
    assert set(our_grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(our_grads[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_qkv_layout_conversion_round_trips():
    cfg, model = build()
    full = parallel.gather_full_state_dict([model])
    back = reference_to_megatron(megatron_to_reference(full, cfg.model), cfg.model)
    for name, t in full.items():
        assert torch.equal(back[name], t), name
    qkv = full["trunk.layers.0.self_attention.linear_qkv.weight"]
    ref_qkv = megatron_to_reference(full, cfg.model)["trunk.blocks.0.attn.qkv.weight"]
    hd = cfg.model.hidden_size // cfg.model.num_heads
    # megatron rows of head 1 are [q1, k1, v1]; the official layout puts k1 at D + hd.
    d = cfg.model.hidden_size
    assert torch.equal(ref_qkv[d + hd:d + 2 * hd], qkv[3 * hd + hd:3 * hd + 2 * hd])


def test_core_attention_matches_plain_softmax_attention():
    """Both core attentions (the local spec's SDPA one and megatron-core's DotProductAttention)
    equal softmax(QK^T / sqrt(d) + mask) V written out by hand."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    cfg, model = build()
    ours = model.trunk.layers[0].self_attention.core_attention
    theirs = DotProductAttention(ours.config, layer_number=1, attn_mask_type=AttnMaskType.arbitrary,
                                 attention_type="self")
    s, b, h, d = cfg.model.num_patches, 3, cfg.model.num_heads, cfg.model.hidden_size // cfg.model.num_heads
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(s, b, h, d, generator=g) for _ in range(3))
    prefix = torch.tensor([1, 5, 15])
    mask = ~prefix_causal_allowed(prefix, s)  # [b, 1, s, s], True = masked (megatron's convention)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / d ** 0.5
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    expected = torch.einsum("bhqk,kbhd->qbhd", probs, v).reshape(s, b, h * d)
    torch.testing.assert_close(ours(q, k, v, prefix), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)


def test_prefix_causal_mask_brute_force():
    prefix = torch.tensor([1, 3, 7])
    allowed = prefix_causal_allowed(prefix, 8)
    for bi, k in enumerate(prefix.tolist()):
        for q in range(8):
            for j in range(8):
                assert allowed[bi, 0, q, j].item() == (j < k or j <= q)


def trunk_tokens(model, images, prefix):
    hidden = model.trunk(model.embed(images), attention_mask=prefix)  # the core attention takes lengths
    return hidden.transpose(0, 1)  # [b, s, D]


def perturb_patch(images, patch, index):
    grid = images.shape[-1] // patch
    r, c = divmod(index, grid)
    out = images.clone()
    out[..., r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] += 3.0
    return out


def test_prefix_mask_really_restricts_attention():
    cfg, model = build()
    p, n = cfg.model.patch_size, cfg.model.num_patches
    images, _ = batch(cfg, n=1)
    prefix = torch.tensor([6])
    base = trunk_tokens(model, images, prefix)

    # A non-prefix patch j influences positions >= j only (causal part).
    j = 10
    moved = trunk_tokens(model, perturb_patch(images, p, j), prefix)
    changed = (moved - base).abs().amax(dim=-1)[0] > 1e-6
    assert not changed[:j].any(), "a future patch leaked into earlier positions"
    assert changed[j:].all()

    # A prefix patch influences every position, earlier prefix positions included (bidirectional).
    moved = trunk_tokens(model, perturb_patch(images, p, 4), prefix)
    assert ((moved - base).abs().amax(dim=-1)[0] > 1e-6).all()

    # Negative control: the same perturbation under a purely causal mask leaves positions < 4 alone,
    # so the check above can fail.
    causal = trunk_tokens(model, images, torch.tensor([1]))
    moved = trunk_tokens(model, perturb_patch(images, p, 4), torch.tensor([1]))
    assert not ((moved - causal).abs().amax(dim=-1)[0, :4] > 1e-6).any()
    # And the prefix mask changes the training loss versus full attention.
    errors_prefix = model(images, prefix)
    errors_full = model(images, None)
    assert (errors_prefix - errors_full).abs().max() > 1e-6
    assert n == 16


def test_loss_counts_only_non_prefix_targets():
    prefix = torch.tensor([1, 4, 15])
    mask = loss_mask(prefix, 16)
    assert mask.shape == (3, 15)
    # Position i predicts patch i+1, which counts when i+1 >= prefix.
    assert mask.sum(dim=1).tolist() == [15, 12, 1]
    assert mask[1, :3].sum() == 0 and mask[1, 3] == 1

    cfg, model = build()
    images, _ = batch(cfg, n=1)
    errors = model(images, prefix[1:2])
    # Counted terms compare against targets 4..15 only: perturbing prefix patch 2 leaves them alone.
    moved = perturb_patch(images, cfg.model.patch_size, 2)
    targets_before = normalized_targets(images, cfg.model.patch_size)
    targets_after = normalized_targets(moved, cfg.model.patch_size)
    assert torch.equal(targets_before[:, 4:], targets_after[:, 4:])
    assert errors.shape == (1, 15)


def test_normalized_targets_and_patch_order():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).reshape(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # Patch 1 is the top-right block; values are ordered (row, col, channel).
    assert patches[0, 1, 0].item() == images[0, 0, 0, 4].item()
    assert patches[0, 1, 1].item() == images[0, 1, 0, 4].item()
    t = normalized_targets(torch.randn(2, 3, 8, 8), 4)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1, unbiased=True), torch.ones(2, 4), atol=1e-4, rtol=0)


def test_sincos_positions_layout():
    pos = sincos_2d(8, 4)  # D/2 = 4 channels for the column, 4 for the row
    assert pos.shape == (16, 8)
    idx = 1 * 4 + 2  # row 1, column 2
    omega = 1.0 / 10000 ** (torch.arange(2) / 2.0)
    torch.testing.assert_close(pos[idx, :2], torch.sin(2 * omega).float())
    torch.testing.assert_close(pos[idx, 2:4], torch.cos(2 * omega).float())
    torch.testing.assert_close(pos[idx, 4:6], torch.sin(1 * omega).float())


@pytest.mark.parametrize("preset,billions", [("aim-600M", 0.681), ("aim-1B", 1.209),
                                             ("aim-3B", 2.720), ("aim-7B", 6.445)])
def test_official_preset_parameter_counts(preset, billions):
    cfg = load_config(None, [f"model.preset={preset}", "train.micro_batch_size=1",
                             "train.global_batch_size=1"])
    parallel.initialize(cfg)
    trunk_cfg, head_cfg = transformer_configs(cfg)
    trunk_cfg.perform_initialization = head_cfg.perform_initialization = False
    with torch.device("meta"):
        model = AIMModel(cfg, trunk_cfg, head_cfg, "local", True, True)
    trunk = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("head."))
    assert round(trunk / 1e9, 3) == billions
    assert 0.40e9 < head < 0.42e9  # the ~0.41B pre-training head, the same for every size
    assert PRESETS[preset]["hidden_size"] // PRESETS[preset]["num_heads"] == 128


def test_backend_selection_falls_back_to_local_without_gpu(monkeypatch):
    import aim_megatron.models.aim as model_mod
    assert select_backend("auto") == ("te" if model_mod.transformer_engine_available() else "local")
    assert select_backend("local") == "local"
    monkeypatch.setattr(model_mod, "transformer_engine_available", lambda: False)
    assert select_backend("auto") == "local"
    with pytest.raises(RuntimeError, match="Transformer Engine"):
        select_backend("te")
    monkeypatch.setattr(model_mod, "transformer_engine_available", lambda: True)
    assert select_backend("auto") == "te"


def test_loss_is_finite_and_near_one_at_init():
    cfg, model = build()
    images, prefix = batch(cfg)
    loss = masked_mean(model(images, prefix), prefix, cfg.model.num_patches)
    # Predictions start near zero and targets are unit-variance per patch.
    assert math.isfinite(loss.item()) and 0.5 < loss.item() < 2.0


def test_block_features_match_reference_block_outputs():
    cfg, model = build()
    ref = ReferenceAIM(cfg.model)
    ref.load_state_dict(megatron_to_reference(parallel.gather_full_state_dict([model]), cfg.model))
    images, _ = batch(cfg)
    _, blocks = ref.features(images)
    ours = model.block_features(images, [1, 3])
    torch.testing.assert_close(ours, (blocks[1] + blocks[3]) / 2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="do not exist"):
        model.block_features(images, [7])


def test_fp8_without_transformer_engine_is_a_clear_error(monkeypatch):
    import aim_megatron.models.aim as model_mod
    monkeypatch.setattr(model_mod, "transformer_engine_available", lambda: False)
    with pytest.raises(RuntimeError, match="train.fp8=hybrid needs Transformer Engine.*train.fp8=null"):
        select_backend("auto", fp8="hybrid")
    with pytest.raises(RuntimeError, match="model.backend=local was requested"):
        select_backend("local", fp8="e4m3")
    monkeypatch.setattr(model_mod, "transformer_engine_available", lambda: True)
    assert select_backend("auto", fp8="hybrid") == "te"


def test_fp8_settings_reach_megatron_and_the_head(monkeypatch):
    """FP8 recipe and amax group go into both TransformerConfigs, and the head's residual blocks
    (outside megatron's TransformerBlock, which enters FP8 autocast itself) run inside the FP8
    context too."""
    cfg = load_config(None, [*TINY, "train.params_dtype=bf16", "train.fp8=hybrid",
                             "train.fp8_recipe=tensorwise", "train.fp8_amax_reduction=tp"])
    for tc in transformer_configs(cfg):
        assert (tc.fp8, tc.fp8_recipe, tc.tp_only_amax_red) == ("hybrid", "tensorwise", True)
    cfg = load_config(None, [*TINY, "train.params_dtype=bf16", "train.fp8=e4m3"])
    assert transformer_configs(cfg)[0].tp_only_amax_red is False  # default: TP x DP group

    import contextlib
    import aim_megatron.models.aim as model_mod
    entered = []

    @contextlib.contextmanager
    def recording(config, *_, **__):
        entered.append(config)
        yield
    monkeypatch.setattr(model_mod, "get_fp8_context", recording)
    cfg, model = build()
    images, prefix = batch(cfg)
    model(images, prefix)
    assert entered == [model.head.config]
