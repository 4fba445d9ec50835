"""Explicit FLOP count of AIM pre-training, for TFLOP/s and MFU.

A matmul of [m, k] x [k, n] costs 2·m·k·n FLOPs; backward costs twice the forward, so a training
step is 3x the forward. Attention scores and values count only the (query, key) pairs the mask
allows: with prefix length k over s tokens, prefix queries see k keys and query q >= k sees q+1.
Norms, GELU and softmax are left out (they are not matmul work, as in Megatron's MFU).
"""
from __future__ import annotations

from typing import Optional

from aim_megatron.config import ModelConfig

# Dense bf16 peak (no sparsity), TFLOP/s per device.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "GH200": 989.0}


def allowed_pairs(num_patches: int, prefix: Optional[float]) -> float:
    """Mean number of attended (query, key) pairs per sample; prefix None = bidirectional."""
    s = num_patches
    if prefix is None:
        return float(s * s)
    # prefix queries: k each sees k keys; causal queries q in [k, s): q + 1 keys.
    k = prefix
    return k * k + (s * (s + 1) - k * (k + 1)) / 2.0


def forward_flops_per_image(m: ModelConfig, prefix: Optional[float] = None) -> float:
    """Forward FLOPs per image; ``prefix`` is the (mean) prefix length, None for full attention."""
    s, d, f = m.num_patches, m.hidden_size, m.ffn_hidden_size
    dh, fh = m.head_hidden_size, m.head_ffn_hidden_size
    embed = 2 * s * m.patch_dim * d
    per_layer = 2 * s * (3 * d * d + d * d + 2 * d * f)            # qkv, proj, fc1, fc2
    attention = 2 * 2 * allowed_pairs(s, prefix) * d              # QK^T and AV over all heads
    trunk = m.num_layers * (per_layer + attention)
    head = 2 * s * (d * dh + m.head_num_layers * 2 * dh * fh + dh * m.patch_dim)
    return embed + trunk + head


def train_flops_per_image(m: ModelConfig) -> float:
    """Forward + backward, averaged over the uniform prefix-length distribution."""
    lo, hi = m.prefix_range
    return 3.0 * sum(forward_flops_per_image(m, k) for k in range(lo, hi + 1)) / (hi - lo + 1)


def device_peak_tflops() -> Optional[float]:
    """bf16 dense peak of the current GPU, or None (CPU, unknown device)."""
    import torch  # here, so FLOP counting itself needs no torch (tools/estimate_memory.py)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None
