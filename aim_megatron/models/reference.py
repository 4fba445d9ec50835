"""AIM v1 in plain PyTorch, written from the architecture description (no megatron-core).

It serves three purposes: the ground truth in equivalence tests, the baseline of the trunk
benchmark, and the official-format side of checkpoint conversion. Parameter names follow the
released AIM v1 state dict (``preprocessor.patchifier.*``, ``trunk.blocks.{i}.*``); qkv rows are
all queries, then all keys, then all values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aim_megatron.models.attention import prefix_causal_allowed
from aim_megatron.config import ModelConfig
from aim_megatron.models.aim import next_patch_errors, normalized_targets, sincos_2d


class Patchifier(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.proj = nn.Conv2d(m.in_channels, m.hidden_size, m.patch_size, m.patch_size)
        self.norm = nn.LayerNorm(m.hidden_size, eps=m.layernorm_eps)

    def forward(self, images):
        return self.norm(self.proj(images).flatten(2).transpose(1, 2))


class Preprocessor(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.patchifier = Patchifier(m)
        self.register_buffer("pos_embed", sincos_2d(m.hidden_size, m.grid_size)[None], persistent=False)

    def forward(self, images):
        return self.patchifier(images) + self.pos_embed


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, allowed=None):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # allowed: True = attend
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.norm_1 = nn.LayerNorm(m.hidden_size, eps=m.layernorm_eps)
        self.attn = Attention(m.hidden_size, m.num_heads)
        self.norm_2 = nn.LayerNorm(m.hidden_size, eps=m.layernorm_eps)
        self.mlp = Mlp(m.hidden_size, m.ffn_hidden_size)

    def forward(self, x, allowed=None):
        x = x + self.attn(self.norm_1(x), allowed)
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(m) for _ in range(m.num_layers))
        self.post_trunk_norm = nn.LayerNorm(m.hidden_size, eps=m.layernorm_eps)

    def forward(self, x, allowed=None, return_blocks=False):
        outs = []
        for blk in self.blocks:
            x = blk(x, allowed)
            outs.append(x)
        x = self.post_trunk_norm(x)
        return (x, outs) if return_blocks else x


class HeadBlock(nn.Module):
    """ml-l3m's head block: a pre-norm block whose attention is the identity, so the attention
    residual adds LN_1(x) itself."""

    def __init__(self, m: ModelConfig):
        super().__init__()
        self.norm_1 = nn.LayerNorm(m.head_hidden_size, eps=m.layernorm_eps)
        self.norm_2 = nn.LayerNorm(m.head_hidden_size, eps=m.layernorm_eps)
        self.mlp = Mlp(m.head_hidden_size, m.head_ffn_hidden_size)

    def forward(self, x):
        x = x + self.norm_1(x)
        return x + self.mlp(self.norm_2(x))


class PredictionHead(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.in_proj = nn.Linear(m.hidden_size, m.head_hidden_size)
        self.register_buffer("pos_embed", sincos_2d(m.head_hidden_size, m.grid_size)[None], persistent=False)
        self.blocks = nn.ModuleList(HeadBlock(m) for _ in range(m.head_num_layers))
        self.norm = nn.LayerNorm(m.head_hidden_size, eps=m.layernorm_eps)
        self.out_proj = nn.Linear(m.head_hidden_size, m.patch_dim)

    def forward(self, x):
        x = self.in_proj(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.out_proj(self.norm(x))


class ReferenceAIM(nn.Module):
    """Plain-PyTorch AIM v1 with the pre-training head."""

    def __init__(self, m: ModelConfig):
        super().__init__()
        self.cfg = m
        self.preprocessor = Preprocessor(m)
        self.trunk = Trunk(m)
        self.head = PredictionHead(m)

    def forward(self, images, prefix_len=None):
        """Per-target-patch errors [b, N-1], as ``AIMModel.forward``."""
        allowed = None if prefix_len is None else prefix_causal_allowed(prefix_len, self.cfg.num_patches)
        x = self.trunk(self.preprocessor(images), allowed)
        pred = self.head(x)
        return next_patch_errors(pred, normalized_targets(images, self.cfg.patch_size))

    def features(self, images):
        """Bidirectional trunk: (post-norm tokens, raw outputs of every block)."""
        return self.trunk(self.preprocessor(images), None, return_blocks=True)


# --------------------------------------------------------------------------- name mapping

def _qkv_megatron_to_official(w: torch.Tensor, heads: int) -> torch.Tensor:
    # megatron packs rows per head: [h0: q k v][h1: q k v]...; official: [q all][k all][v all].
    three_d, d = w.shape
    return w.view(heads, 3, three_d // (3 * heads), d).transpose(0, 1).reshape(three_d, d)


def _qkv_official_to_megatron(w: torch.Tensor, heads: int) -> torch.Tensor:
    three_d, d = w.shape
    return w.view(3, heads, three_d // (3 * heads), d).transpose(0, 1).reshape(three_d, d)


def _block_pairs(a: str, b: str, attention: tuple[tuple[str, str], ...] = ()
                 ) -> list[tuple[str, str]]:
    """(megatron, reference) names of one pre-norm block with prefixes a and b; the attention's
    weight pairs sit between the two norms, in the order the released state dict lists them."""
    return [(a + "input_layernorm.weight", b + "norm_1.weight"),
            (a + "input_layernorm.bias", b + "norm_1.bias"),
            *attention,
            (a + "pre_mlp_layernorm.weight", b + "norm_2.weight"),
            (a + "pre_mlp_layernorm.bias", b + "norm_2.bias"),
            (a + "mlp.linear_fc1.weight", b + "mlp.fc1.weight"),
            (a + "mlp.linear_fc2.weight", b + "mlp.fc2.weight")]


def _name_pairs(m: ModelConfig) -> list[tuple[str, str]]:
    """(megatron full name, reference name) for every parameter."""
    pairs = [
        ("patch_embed.proj.weight", "preprocessor.patchifier.proj.weight"),
        ("patch_embed.proj.bias", "preprocessor.patchifier.proj.bias"),
        ("patch_embed.norm.weight", "preprocessor.patchifier.norm.weight"),
        ("patch_embed.norm.bias", "preprocessor.patchifier.norm.bias"),
        ("post_trunk_norm.weight", "trunk.post_trunk_norm.weight"),
        ("post_trunk_norm.bias", "trunk.post_trunk_norm.bias"),
    ]
    for i in range(m.num_layers):
        a, b = f"trunk.layers.{i}.", f"trunk.blocks.{i}."
        pairs += _block_pairs(a, b, ((a + "self_attention.linear_qkv.weight", b + "attn.qkv.weight"),
                                     (a + "self_attention.linear_proj.weight", b + "attn.proj.weight")))
    for name in ("in_proj.weight", "in_proj.bias", "norm.weight", "norm.bias",
                 "out_proj.weight", "out_proj.bias"):
        pairs.append(("head." + name, "head." + name))
    for i in range(m.head_num_layers):
        a, b = f"head.blocks.{i}.", f"head.blocks.{i}."
        pairs += _block_pairs(a, b)   # the head's identity attention has no weights
    return pairs


def name_map(m: ModelConfig) -> dict[str, str]:
    """Megatron full name -> reference (released) name, in the released state dict's order."""
    return dict(_name_pairs(m))


def state_dict_mismatch(sd: dict, expected: dict[str, tuple]) -> tuple[str, str]:
    """How a file's state dict differs from the expected ``{key: shape}``, for the converters'
    one-line errors: (the first key present with another shape, else ""; the missing and
    unexpected keys, else ""). Both "" when it fits."""
    for key, shape in expected.items():
        if key in sd and tuple(sd[key].shape) != shape:
            return (f"shape mismatch at {key}: the file has {list(sd[key].shape)}, the configured model "
                    f"expects {list(shape)}"), ""
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    parts = [f"{len(missing)} missing keys, e.g. {missing[:3]}" if missing else "",
             f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}" if unexpected else ""]
    return "", "; ".join(p for p in parts if p)


def _rename(sd: dict[str, torch.Tensor], pairs, qkv_fn, side: str, strict: bool, heads: int):
    out = {}
    for src, dst in pairs:
        if src not in sd:
            if strict:
                raise KeyError(f"{src} missing from the {side} state dict")
            continue
        out[dst] = qkv_fn(sd[src], heads) if src.endswith("qkv.weight") else sd[src]
    return out


def megatron_to_reference(full: dict[str, torch.Tensor], m: ModelConfig, strict: bool = True
                          ) -> dict[str, torch.Tensor]:
    """Full megatron-layout dict (see ``parallel.gather_full_state_dict``) -> reference names."""
    return _rename(full, _name_pairs(m), _qkv_megatron_to_official, "megatron", strict, m.num_heads)


def reference_to_megatron(ref: dict[str, torch.Tensor], m: ModelConfig, strict: bool = True
                          ) -> dict[str, torch.Tensor]:
    """Reference/official names -> full megatron-layout dict."""
    pairs = [(dst, src) for src, dst in _name_pairs(m)]
    return _rename(ref, pairs, _qkv_official_to_megatron, "reference", strict, m.num_heads)
