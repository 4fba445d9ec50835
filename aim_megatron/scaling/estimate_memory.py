"""Per-GPU memory of AIM training for a preset/config and a Megatron layout (formulas: sizing.py).

    python tools/estimate_memory.py --preset aim-7B --gpus 64
    python tools/estimate_memory.py --preset aim-7B --gpus 64 --tp 2 --mbs 8 --recompute selective
    python tools/estimate_memory.py --config my.yaml --gpus 16 train.micro_batch_size=4
    python tools/estimate_memory.py --table [--gpus 8 64 512 4096]    # recommended layouts

--preset uses the H100 recipe in examples/slurm/configs/ (bf16, distributed optimizer, batch 4096)
when there is one. Not counted: CUDA context, NCCL/TE workspaces, fragmentation (--reserve-gib).
Exit codes: 0 ok, 1 bad input or, with --check, a peak that does not fit.
"""
from __future__ import annotations

import argparse
import sys

from aim_megatron.config import ConfigError, validate
from aim_megatron.scaling import sizing
from aim_megatron.scaling.sizing import GIB

TABLE_PRESETS = ("aim-600M", "aim-1B", "aim-3B", "aim-7B")
TABLE_GPUS = (8, 64, 256, 512, 1024, 2048, 4096)


def layout_overrides(args) -> list[str]:
    """Shortcut flags as section.key=value overrides (only the ones given)."""
    out = []
    for flag, key in (("tp", "parallel.tp"), ("pp", "parallel.pp"), ("vp", "parallel.vp"),
                      ("mbs", "train.micro_batch_size"), ("gbs", "train.global_batch_size"),
                      ("precision", "train.params_dtype")):
        if getattr(args, flag, None) is not None:
            out.append(f"{key}={getattr(args, flag)}")
    if getattr(args, "sp", None) is not None:
        out.append(f"parallel.sequence_parallel={str(args.sp).lower()}")
    if getattr(args, "distopt", None) is not None:
        out.append(f"parallel.use_distributed_optimizer={str(args.distopt).lower()}")
        if not args.distopt:   # param-gather overlap exists only with the distributed optimizer
            out.append("parallel.overlap_param_gather=false")
    if getattr(args, "recompute", None) is not None:
        out.append(f"parallel.recompute_granularity={'null' if args.recompute == 'none' else args.recompute}")
    return out


def add_layout_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", help="YAML config")
    ap.add_argument("--preset", help="aim-600M, aim-1B, aim-3B, aim-7B or a CPU preset")
    ap.add_argument("--tp", type=int)
    ap.add_argument("--pp", type=int)
    ap.add_argument("--vp", type=int)
    ap.add_argument("--mbs", type=int, help="micro-batch size (images)")
    ap.add_argument("--gbs", type=int, help="global batch size (images)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")


def print_estimate(cfg, world: int, est: sizing.MemoryEstimate, args) -> bool:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    per_layer = sizing.layer_activation_bytes(
        m.num_patches, t.micro_batch_size, m.hidden_size, m.num_heads, m.ffn_hidden_size, p.tp,
        p.sequence_parallel, p.recompute_granularity, 2 if t.params_dtype == "bf16" else 4,
        args.dropout, args.flash)
    print(f"{m.preset or 'model'}: tp={p.tp} pp={p.pp} vp={p.vp or '-'} dp={est.dp} ({world} GPUs), "
          f"micro-batch {t.micro_batch_size} x {est.num_microbatches} micro-batches x dp "
          f"= {t.global_batch_size}")
    print(f"  {t.params_dtype}, {'distributed' if p.use_distributed_optimizer else 'replicated'} "
          f"optimizer, SP {'on' if p.sequence_parallel else 'off'}, recompute "
          f"{p.recompute_granularity or 'none'}, {'flash' if args.flash else 'unfused'} attention; "
          f"activations per trunk layer per micro-batch {per_layer / 2**20:.1f} MiB")
    print(f"  {'stage':>5} {'layers':>6} {'params/GPU':>11} {'in-flight':>9} {'weights':>8} {'grads':>8} "
          f"{'optim':>8} {'activ':>8} {'total':>8}  [GiB]")
    for st in est.stages:
        print(f"  {st.stage:>5} {st.layers:>6} {st.params / 1e9:>10.3f}B {st.in_flight:>9.2f} "
              f"{st.weights / GIB:>8.2f} {st.grads / GIB:>8.2f} {st.optimizer / GIB:>8.2f} "
              f"{st.activations / GIB:>8.2f} {st.total / GIB:>8.2f}")
    peak = est.peak
    usable = args.gpu_mem_gib - args.reserve_gib
    fits = peak.total / GIB <= usable
    print(f"  peak {peak.total / GIB:.2f} GiB on stage {peak.stage}: "
          f"{'fits' if fits else 'does NOT fit'} in {args.gpu_mem_gib:g} GiB less a "
          f"{args.reserve_gib:g} GiB reserve")
    return fits


def print_table(args) -> None:
    print("| preset | GPUs | TP | PP | DP | micro-batch | micro-batches | recompute | "
          "peak GiB/GPU | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for preset in TABLE_PRESETS:
        cfg = sizing.resolve_config(None, preset, layout_overrides(args) + args.overrides)
        for world in args.gpus or TABLE_GPUS:
            c = sizing.recommend_layout(cfg, world, args.gpus_per_node,
                                        budget_gib=args.gpu_mem_gib - args.reserve_gib)
            note = c.note or (f"{c.trunk_layers_in_last_stage} trunk layers on the last stage"
                              if c.trunk_layers_in_last_stage is not None else "")
            print(f"| {preset} | {world} | {c.tp} | {c.pp} | {c.dp} | {c.micro_batch_size} | "
                  f"{c.num_microbatches} | {c.recompute or 'none'} | {c.peak_gib:.1f} | {note} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_flags(ap)
    ap.add_argument("--gpus", type=int, nargs="*", help="world size (several with --table)")
    ap.add_argument("--dp", type=int, help="data-parallel size instead of --gpus")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--sp", action=argparse.BooleanOptionalAction, help="sequence parallel")
    ap.add_argument("--distopt", action=argparse.BooleanOptionalAction,
                    help="distributed optimizer (shards fp32 master + Adam states over DP)")
    ap.add_argument("--recompute", choices=["none", "selective", "full"])
    ap.add_argument("--precision", choices=["bf16", "fp32"])
    ap.add_argument("--flash", action="store_true", help="fused/flash attention (no s^2 scores)")
    ap.add_argument("--dropout", action="store_true", help="count dropout masks (AIM has none)")
    ap.add_argument("--gpu-mem-gib", type=float, default=sizing.H100_USABLE_GIB)
    ap.add_argument("--reserve-gib", type=float, default=6.0,
                    help="CUDA context, NCCL/TE workspaces, fragmentation")
    ap.add_argument("--check", action="store_true", help="exit 1 when the peak does not fit")
    ap.add_argument("--table", action="store_true",
                    help="recommended layouts of the AIM presets for several GPU counts (markdown)")
    args = ap.parse_args(argv)
    try:
        if args.table:
            print_table(args)
            return 0
        cfg = sizing.resolve_config(args.config, args.preset, layout_overrides(args) + args.overrides)
        if args.dp is not None:
            world = args.dp * cfg.parallel.tp * cfg.parallel.pp
        else:
            world = (args.gpus or [8])[0]
        validate(cfg, world)
        fits = print_estimate(cfg, world, sizing.estimate_memory(cfg, world, args.flash, args.dropout),
                              args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0 if fits or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
