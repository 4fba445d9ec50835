"""AIM v1 in plain PyTorch, written from the architecture description (no megatron-core).

It serves three purposes: the ground truth in equivalence tests, the baseline of the trunk
benchmark, and the official-format side of checkpoint conversion (its state dict's keys and
shapes are what an imported file is checked against). Parameter names follow the released AIM v1
state dict (``preprocessor.patchifier.*``, ``trunk.blocks.{i}.*``); qkv rows are all queries,
then all keys, then all values. The maps to megatron-core's names live in
``aim_megatron/checkpoint/official.py``.
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
