"""Fidelity to Apple's official AIM v1 code (apple/ml-aim, apple/ml-l3m).

The "official" side of every test here is written out in the test from what the official code
does (docs/fidelity.md, /work/shared/FACTS.md section 1): plain torch ops, key names, shapes and
statistics; never our own modules."""
import math

import torch
import torch.nn.functional as F

from aim_megatron.distributed import parallel
from aim_megatron.config import load_config
from conftest import TINY


def build(overrides=()):
    cfg = load_config(None, [*TINY, "train.micro_batch_size=2", "train.global_batch_size=2", *overrides])
    parallel.initialize(cfg)
    (model,) = parallel.build_model(cfg, wrap_ddp=False)
    return cfg, model


def official_head_block(x, ln1_w, ln1_b, ln2_w, ln2_b, fc1, fc2, eps):
    """ml-l3m SimpleDecoder block: l3m.model.trunks.transformer.Block with
    attn_target=GenericIdentity and use_bias=False:
        x = x + attn(norm_1(x))   (attn = identity)
        x = x + mlp(norm_2(x))    (mlp = fc2(GELU(fc1(.))), no biases)"""
    d = x.shape[-1]
    x = x + F.layer_norm(x, (d,), ln1_w, ln1_b, eps)
    return x + F.linear(F.gelu(F.linear(F.layer_norm(x, (d,), ln2_w, ln2_b, eps), fc1)), fc2)


def test_head_block_is_the_official_identity_attention_block(one_thread):
    cfg, model = build()
    torch.manual_seed(0)
    block = model.head.blocks[0]
    with torch.no_grad():  # non-trivial norms so LN_1's affine parameters matter
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(cfg.model.num_patches, 2, cfg.model.head_hidden_size)  # [s, b, h]
    ours, _ = block(x, attention_mask=None)
    sd = dict(block.named_parameters())
    theirs = official_head_block(
        x, sd["input_layernorm.weight"], sd["input_layernorm.bias"],
        sd["pre_mlp_layernorm.weight"], sd["pre_mlp_layernorm.bias"],
        sd["mlp.linear_fc1.weight"], sd["mlp.linear_fc2.weight"], cfg.model.layernorm_eps)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # Each block holds exactly the official block's tensors (two LNs, fc1, fc2; no biases).
    hh, ff = cfg.model.head_hidden_size, cfg.model.head_ffn_hidden_size
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "input_layernorm.weight": (hh,), "input_layernorm.bias": (hh,),
        "pre_mlp_layernorm.weight": (hh,), "pre_mlp_layernorm.bias": (hh,),
        "mlp.linear_fc1.weight": (ff, hh), "mlp.linear_fc2.weight": (hh, ff)}


def test_reference_head_block_is_the_official_block(one_thread):
    from aim_megatron.models.reference import HeadBlock
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    blk = HeadBlock(cfg.model)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, cfg.model.num_patches, cfg.model.head_hidden_size)
    sd = dict(blk.named_parameters())
    # ml-l3m names inside a decoder block: norm_1, norm_2, mlp.fc1, mlp.fc2
    assert set(sd) == {"norm_1.weight", "norm_1.bias", "norm_2.weight", "norm_2.bias",
                       "mlp.fc1.weight", "mlp.fc2.weight"}
    theirs = official_head_block(x, sd["norm_1.weight"], sd["norm_1.bias"], sd["norm_2.weight"],
                                 sd["norm_2.bias"], sd["mlp.fc1.weight"], sd["mlp.fc2.weight"],
                                 cfg.model.layernorm_eps)
    torch.testing.assert_close(blk(x), theirs, rtol=1e-5, atol=1e-6)


# The released head.* of an AIM v1 checkpoint (ml-aim aim/v1/torch/layers.py
# AttentionPoolingClassifier(dim, classes, num_heads, num_queries=1, qkv_bias=False,
# linear_bias=False), BatchNorm1d(dim, affine=False, eps=1e-6)); D = width, C = classes.
def official_probe_shapes(d, c):
    return {"cls_token": (1, 1, d), "k.weight": (d, d), "v.weight": (d, d), "linear.weight": (c, d),
            "bn.running_mean": (d,), "bn.running_var": (d,), "bn.num_batches_tracked": ()}


def test_probe_key_set_is_the_official_one():
    from aim_megatron.evaluation.probe import AttentiveProbe
    probe = AttentiveProbe(1536, 12, 1000)
    assert {k: tuple(v.shape) for k, v in probe.state_dict().items()} == official_probe_shapes(1536, 1000)
    assert probe.bn.eps == 1e-6 and probe.bn.weight is None


def test_official_probe_loads_strict_and_computes_the_official_function(one_thread):
    from aim_megatron.evaluation.probe import AttentiveProbe
    d, c, heads = 32, 5, 4
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) if s else torch.tensor(3) for k, s in official_probe_shapes(d, c).items()}
    sd["bn.running_var"] = sd["bn.running_var"].abs() + 0.5
    probe = AttentiveProbe(d, heads, c)
    probe.load_state_dict(sd)  # strict
    probe.eval()
    x = torch.randn(2, 7, d, generator=g)
    # official forward, eval mode
    xn = (x - sd["bn.running_mean"]) / torch.sqrt(sd["bn.running_var"] + 1e-6)
    split = lambda t: t.reshape(2, -1, heads, d // heads).transpose(1, 2)
    q = split(sd["cls_token"].expand(2, -1, -1))
    pooled = F.scaled_dot_product_attention(q, split(xn @ sd["k.weight"].T), split(xn @ sd["v.weight"].T))
    expected = pooled.transpose(1, 2).reshape(2, 1, d).mean(1) @ sd["linear.weight"].T
    torch.testing.assert_close(probe(x), expected, rtol=1e-5, atol=1e-5)
    assert {k: tuple(v.shape) for k, v in probe.state_dict().items()} == official_probe_shapes(d, c)


# ml-l3m init (Transformer/SimpleDecoder._init_weights with weight_init_style xavier_uniform):
# every nn.Linear weight ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out)) (std a / sqrt(3)), biases 0,
# LayerNorms 1/0; the patch conv's weight xavier over its [D, C*p*p] view, its bias left at
# PyTorch's Conv2d default U(-1/sqrt(C*p*p), 1/sqrt(C*p*p)).
def assert_xavier(name, w, fan_in, fan_out):
    a = math.sqrt(6.0 / (fan_in + fan_out))
    assert w.abs().max().item() <= a + 1e-7, name
    n = w.numel()
    # std of U(-a, a) is a/sqrt(3); the sample std is within ~4 standard errors
    assert abs(w.std().item() / (a / math.sqrt(3)) - 1) < 4 * 0.9 / math.sqrt(n) + 0.01, (name, n)
    assert abs(w.mean().item()) < 4 * a / math.sqrt(3 * n), name


def test_official_init_is_xavier_uniform_everywhere(one_thread):
    cfg, model = build(["model.hidden_size=64", "model.num_heads=4", "model.head_hidden_size=64",
                        "model.head_ffn_hidden_size=256"])
    assert cfg.model.init_method == "official"  # the default
    m = cfg.model
    d, f, hh, hf = m.hidden_size, m.ffn_hidden_size, m.head_hidden_size, m.head_ffn_hidden_size
    fans = {"self_attention.linear_qkv.weight": (d, 3 * d), "self_attention.linear_proj.weight": (d, d),
            "mlp.linear_fc1.weight": (d, f), "mlp.linear_fc2.weight": (f, d)}
    seen = 0
    for name, p in model.named_parameters():
        if name.startswith("trunk.layers."):
            suffix = name.split(".", 3)[3]
            if suffix in fans:
                assert_xavier(name, p, *fans[suffix]); seen += 1
        elif name.startswith("head.blocks."):
            suffix = name.split(".", 3)[3]
            if suffix == "mlp.linear_fc1.weight":
                assert_xavier(name, p, hh, hf); seen += 1
            elif suffix == "mlp.linear_fc2.weight":
                assert_xavier(name, p, hf, hh); seen += 1
        if "layernorm" in name or "norm." in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
    assert seen == 4 * m.num_layers + 2 * m.head_num_layers
    assert_xavier("head.in_proj", model.head.in_proj.weight, d, hh)
    assert_xavier("head.out_proj", model.head.out_proj.weight, hh, m.patch_dim)
    assert torch.all(model.head.in_proj.bias == 0) and torch.all(model.head.out_proj.bias == 0)
    conv = model.patch_embed.proj
    assert_xavier("patch conv", conv.weight.view(d, -1), m.patch_dim, d)
    bound = 1 / math.sqrt(m.patch_dim)
    assert conv.bias.abs().max() <= bound and conv.bias.abs().max() > 0.5 * bound  # default, not zeros


def test_megatron_init_stays_available(one_thread):
    cfg, model = build(["model.init_method=megatron"])
    w = model.trunk.layers[0].mlp.linear_fc1.weight
    assert abs(w.std().item() / cfg.model.init_std - 1) < 0.1
    assert torch.all(model.patch_embed.proj.bias == 0)


def test_layernorm_eps_is_the_training_configs():
    # ml-l3m configs/aimv1: LayerNormFP32(eps=1e-5) in the patch embed, trunk and head
    cfg, model = build()
    assert cfg.model.layernorm_eps == 1e-5
    norms = [mod for mod in model.modules() if isinstance(mod, torch.nn.LayerNorm)]
    assert len(norms) == 1 + 2 * cfg.model.num_layers + 1 + 2 * cfg.model.head_num_layers + 1
    assert all(n.eps == 1e-5 for n in norms)


def test_gpu_style_shard_reinit_uses_the_full_matrix_fans(one_thread):
    """GPU init draws each TP shard alone; reinit_official_tp_shards redraws it from the full
    matrix's xavier bound. Here a TP=1 model's linears stand for TP=2 shards: a column-parallel
    [out, in] shard belongs to a [2*out, in] matrix, a row-parallel one to [out, 2*in]."""
    from aim_megatron.models.aim import reinit_official_tp_shards
    cfg, model = build(["model.hidden_size=64", "model.num_heads=4"])
    reinit_official_tp_shards(model, tp=2)
    d, f = cfg.model.hidden_size, cfg.model.ffn_hidden_size
    layer = model.trunk.layers[0]
    assert_xavier("qkv (column)", layer.self_attention.linear_qkv.weight, d, 2 * 3 * d)
    assert_xavier("proj (row)", layer.self_attention.linear_proj.weight, 2 * d, d)
    assert_xavier("fc1 (column)", layer.mlp.linear_fc1.weight, d, 2 * f)
    assert_xavier("fc2 (row)", layer.mlp.linear_fc2.weight, 2 * f, d)
