"""Prefix-causal attention on CPU: torch's fused (flash) SDPA kernel vs its math path, forward +
backward, in the trainer's dtypes, measured in the same run. It backs the rule in
aim_megatron/models/attention.py (``CPU_HALF_MATH_MAX_TOKENS``): in bf16, short sequences take the math path.

    python benchmarks/cpu_attention.py [--iters 5] [--threads 2]

Rows: sequence length, head dim, heads, batch (the demo's trunk is 49 tokens, 4 heads of 32, batch
128); columns: ms per forward+backward of each kernel and fused/math (> 1: the math path is faster).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [(49, 32, 4, 128), (64, 32, 4, 96), (100, 32, 4, 64), (196, 32, 4, 32), (196, 64, 8, 16),
          (256, 128, 8, 8)]


def ms_per_call(backend, q, k, v, mask, iters: int) -> float:
    def call():
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.float().sum().backward()
    for _ in range(2):
        call()
    start = time.perf_counter()
    for _ in range(iters):
        call()
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; ms per forward+backward")
    print(f"{'dtype':<9} {'tokens':>6} {'head dim':>8} {'heads':>5} {'batch':>5} {'fused ms':>9} {'math ms':>8} "
          f"{'fused/math':>10}")
    for dtype in (torch.bfloat16, torch.float32):
        for s, d, h, b in SHAPES:
            prefix = torch.randint(1, s, (b,), generator=g)
            idx = torch.arange(s)
            mask = ((idx[None, None, :] < prefix[:, None, None]) | (idx[None, :] <= idx[:, None])[None]).unsqueeze(1)
            q, k, v = (torch.randn(b, h, s, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
            fused = ms_per_call(SDPBackend.FLASH_ATTENTION, q, k, v, mask, args.iters)
            math = ms_per_call(SDPBackend.MATH, q, k, v, mask, args.iters)
            print(f"{str(dtype).removeprefix('torch.'):<9} {s:>6} {d:>8} {h:>5} {b:>5} {fused:>9.1f} {math:>8.1f} "
                  f"{fused / math:>10.2f}")


if __name__ == "__main__":
    main()
