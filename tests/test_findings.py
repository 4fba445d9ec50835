"""The ablation switches behind docs/findings.md (plain causal, raw-pixel targets, linear head)."""
import pytest
import torch

from aim_megatron import parallel
from aim_megatron.attention import prefix_causal_allowed
from aim_megatron.config import ConfigError, load_config, validate
from aim_megatron.model import loss_mask, patchify, pixel_targets
from conftest import TINY


def build(overrides=()):
    cfg = load_config(None, [*TINY, "train.micro_batch_size=4", "train.global_batch_size=4", *overrides])
    parallel.initialize(cfg)
    (model,) = parallel.build_model(cfg, wrap_ddp=False)
    return cfg, model


def test_prefix_zero_is_plain_causal_and_every_target_counts():
    cfg = load_config(None, [*TINY, "model.prefix_min=0", "model.prefix_max=0"])
    validate(cfg)
    assert cfg.model.prefix_range == (0, 0)
    with pytest.raises(ConfigError, match=r"\[0, 0\] for plain causal"):
        validate(load_config(None, [*TINY, "model.prefix_min=0", "model.prefix_max=3"]))
    n = cfg.model.num_patches
    assert loss_mask(torch.zeros(2, dtype=torch.long), n).sum() == 2 * (n - 1)
    allowed = prefix_causal_allowed(torch.zeros(1, dtype=torch.long), n)[0, 0]
    assert torch.equal(allowed, torch.ones(n, n).tril().bool())


def test_raw_targets_are_the_input_patches(one_thread):
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(pixel_targets(images, 4, normalize=False), patchify(images, 4))
    norm = pixel_targets(images, 4)
    torch.testing.assert_close(norm.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    cfg, model = build(["model.target_norm=false"])
    torch.manual_seed(0)
    _, ref = build()
    ref.load_state_dict(model.state_dict())
    prefix = torch.full((2,), 3)
    raw_err, norm_err = model(images, prefix), ref(images, prefix)
    pred = ref.head(ref.post_trunk_norm(ref.trunk(ref.embed(images), attention_mask=prefix))).transpose(0, 1)
    want = ((pred[:, :-1] - patchify(images, 4)[:, 1:]) ** 2).mean(-1)
    torch.testing.assert_close(raw_err, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(raw_err, norm_err)


def test_linear_head_is_one_linear_layer(one_thread):
    cfg, model = build(["model.head_type=linear"])
    m = cfg.model
    assert isinstance(model.head, torch.nn.Linear)
    assert sum(p.numel() for p in model.head.parameters()) == m.hidden_size * m.patch_dim + m.patch_dim
    images = torch.randn(4, 3, 16, 16)
    errors = model(images, torch.full((4,), 2))
    assert errors.shape == (4, m.num_patches - 1) and torch.isfinite(errors).all()
    with pytest.raises(ConfigError, match="head_type"):
        validate(load_config(None, [*TINY, "model.head_type=conv"]))
