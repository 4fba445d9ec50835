"""Forward+backward throughput of AIM on megatron-core (TP=1) vs a plain-PyTorch AIM of identical
shape and weights, measured in the same run. Target: megatron >= 0.95x the plain reference.

    python benchmarks/trunk_throughput.py [--preset aim-base-cpu] [--batch 32] [--iters 10]

Rows: the trunk alone (patch embedding + blocks, prefix-causal) and the whole pre-training model
(trunk + head + loss). Timings alternate between the two implementations in rounds; the ratio is
the median of the per-round ratios (each from two back-to-back timings), so drift in machine load
hits both alike, and the spread of those ratios is printed beside it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from aim_megatron.checkpoint.official import megatron_to_reference
from aim_megatron.config import load_config
from aim_megatron.distributed import parallel
from aim_megatron.models.aim import loss_mask
from aim_megatron.models.attention import prefix_causal_allowed
from aim_megatron.models.reference import ReferenceAIM


def timed(fn, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="aim-base-cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5, help="iterations per timing round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(None, [f"model.preset={args.preset}", f"train.micro_batch_size={args.batch}",
                             f"train.global_batch_size={args.batch}"])
    parallel.initialize(cfg)
    (ours,) = parallel.build_model(cfg, wrap_ddp=False)
    ref = ReferenceAIM(cfg.model)
    ref.load_state_dict(megatron_to_reference(parallel.gather_full_state_dict([ours]), cfg.model))

    m = cfg.model
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, m.in_channels, m.image_size, m.image_size, generator=g)
    lo, hi = m.prefix_range
    prefix = torch.randint(lo, hi + 1, (args.batch,), generator=g)
    mask = loss_mask(prefix, m.num_patches)

    def ours_trunk():
        h = ours.trunk(ours.embed(images), attention_mask=prefix)  # core attention takes lengths
        h.float().square().mean().backward()

    def ref_trunk():
        x = ref.trunk(ref.preprocessor(images), prefix_causal_allowed(prefix, m.num_patches))
        x.square().mean().backward()

    def ours_full():
        ((ours(images, prefix) * mask).sum() / mask.sum()).backward()

    def ref_full():
        ((ref(images, prefix) * mask).sum() / mask.sum()).backward()

    rows = []
    for label, a, b in (("trunk", ours_trunk, ref_trunk), ("trunk+head+loss", ours_full, ref_full)):
        for fn in (a, b):  # warm-up
            timed(fn, 2)
        t_ours, t_ref = [], []
        for _ in range(args.rounds):
            t_ours.append(timed(a, args.iters))
            t_ref.append(timed(b, args.iters))
        # Each round's ratio compares two back-to-back timings under the same machine load.
        ratios = sorted(r / o for o, r in zip(t_ours, t_ref))
        rows.append((label, statistics.median(t_ours), statistics.median(t_ref), ratios))

    tokens = args.batch * m.num_patches
    print(f"\nAIM {args.preset}: {m.num_layers} layers, width {m.hidden_size}, {m.num_patches} patches, "
          f"batch {args.batch}, fp32, {torch.get_num_threads()} threads, forward+backward\n")
    print("| part | impl | ms/iter | images/s | tokens/s | megatron / plain | per-round range |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, t_ours, t_ref, ratios in rows:
        for impl, t in (("megatron-core TP=1", t_ours), ("plain PyTorch", t_ref)):
            ours = impl.startswith("megatron")
            ratio = f"{statistics.median(ratios):.3f}x" if ours else ""
            spread = f"{ratios[0]:.3f}-{ratios[-1]:.3f}" if ours else ""
            print(f"| {label} | {impl} | {t * 1e3:.1f} | {args.batch / t:,.0f} | {tokens / t:,.0f} | {ratio} "
                  f"| {spread} |")
    print("\nmegatron / plain: median over rounds of (plain time / megatron time) in the same round.")
    parallel.shutdown()


if __name__ == "__main__":
    main()
