"""Dry-run of a Slurm allocation: resolve and check the TP/PP/VP/DP layout before queueing.

    python tools/slurm_layout.py --preset aim-7B --nodes 8
    python tools/slurm_layout.py --config examples/slurm/configs/aim-3B.yaml --nodes 64 --tp 2
    python tools/slurm_layout.py --preset aim-1B --nodes 4 --gpus-per-node 4 --pp 2 --vp 3 --json
    python tools/slurm_layout.py --preset aim-7B --nodes 512 --recommend

Checks config.validate() for the world size nodes x gpus-per-node, that TP groups stay inside a
node, and megatron-core's interleaved-schedule rule; exits 2 with a message naming the fix when
the layout does not divide. --recommend prints the layout tools/estimate_memory.py --table picks.
"""
from __future__ import annotations

import argparse
import json
import sys

from aim_megatron.config import ConfigError, num_microbatches, trunk_layers_per_stage
from aim_megatron.scaling import sizing
from aim_megatron.scaling.estimate_memory import add_layout_flags, layout_overrides
from aim_megatron.scaling.sizing import GIB


def resolve_layout(cfg, nodes: int, gpus_per_node: int) -> tuple[dict, list[str]]:
    world = nodes * gpus_per_node
    warnings = sizing.check_layout(cfg, world, gpus_per_node)
    p, t = cfg.parallel, cfg.train
    m = num_microbatches(cfg, world)
    est = sizing.estimate_memory(cfg, world)
    layout = {
        "preset": cfg.model.preset, "nodes": nodes, "gpus_per_node": gpus_per_node,
        "world_size": world, "tp": p.tp, "pp": p.pp, "vp": p.vp,
        "dp": p.data_parallel_size(world), "sequence_parallel": p.sequence_parallel,
        "micro_batch_size": t.micro_batch_size, "num_microbatches": m,
        "global_batch_size": t.global_batch_size,
        "trunk_layers_per_stage": trunk_layers_per_stage(cfg.model, p),
        "pipeline_bubble": sizing.pipeline_bubble(p.pp, p.vp or 1, m),
        "peak_memory_gib": round(est.peak.total / GIB, 2), "peak_memory_stage": est.peak.stage,
        "recompute": p.recompute_granularity,
        "distributed_optimizer": p.use_distributed_optimizer,
    }
    return layout, warnings


def print_layout(layout: dict, warnings: list[str]) -> None:
    L = layout
    print(f"layout of {L['preset'] or 'model'} on {L['nodes']} node(s) x {L['gpus_per_node']} GPUs "
          f"= {L['world_size']} GPUs")
    rows = [
        ("tensor parallel (TP)",
         f"{L['tp']}" + (" (sequence parallel on)" if L["sequence_parallel"] else "")),
        ("pipeline parallel (PP)", f"{L['pp']}"),
        ("virtual stages (VP)", f"{L['vp'] or '-'}"),
        ("data parallel (DP)", f"{L['dp']}"),
        ("world size", f"{L['world_size']} = tp {L['tp']} x pp {L['pp']} x dp {L['dp']}"),
        ("micro-batch size", f"{L['micro_batch_size']}"),
        ("micro-batches per step", f"{L['num_microbatches']}"),
        ("global batch", f"{L['global_batch_size']} = {L['micro_batch_size']} x "
                         f"{L['num_microbatches']} x dp {L['dp']}"),
        ("trunk layers per stage", " ".join(map(str, L["trunk_layers_per_stage"]))),
        ("pipeline bubble", f"{100 * L['pipeline_bubble']:.1f}%"),
        ("recompute", f"{L['recompute'] or 'none'}"),
        ("memory per GPU (est.)", f"{L['peak_memory_gib']:.1f} GiB peak on stage "
                                  f"{L['peak_memory_stage']} (tools/estimate_memory.py for details)"),
    ]
    for key, value in rows:
        print(f"  {key:<24} {value}")
    for w in warnings:
        print(f"warning: {w}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layout_flags(ap)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="print the layout as JSON")
    ap.add_argument("--recommend", action="store_true",
                    help="print the recommended layout for this many GPUs instead")
    args = ap.parse_args(argv)
    cfg = None
    try:
        cfg = sizing.resolve_config(args.config, args.preset, layout_overrides(args) + args.overrides)
        world = args.nodes * args.gpus_per_node
        if args.recommend:
            c = sizing.recommend_layout(cfg, world, args.gpus_per_node)
            flags = [f"parallel.tp={c.tp}", f"parallel.pp={c.pp}",
                     f"parallel.sequence_parallel={str(c.tp > 1).lower()}",
                     f"train.micro_batch_size={c.micro_batch_size}"]
            if c.trunk_layers_in_last_stage is not None:
                flags.append(f"parallel.trunk_layers_in_last_stage={c.trunk_layers_in_last_stage}")
            if c.recompute:
                flags.append(f"parallel.recompute_granularity={c.recompute}")
            print(" ".join(flags))
            if c.note:
                print(f"note: {c.note}")
            return 0
        layout, warnings = resolve_layout(cfg, args.nodes, args.gpus_per_node)
    except ConfigError as exc:
        msg = f"error: layout does not work for {args.nodes} node(s) x {args.gpus_per_node} GPUs: {exc}"
        fix = sizing.micro_batch_fix(cfg, args.nodes * args.gpus_per_node) if cfg else None
        if fix and "global_batch_size" in str(exc):
            msg += f"; for this global batch the largest micro-batch that divides is {fix}"
        print(msg, file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**layout, "warnings": warnings}, indent=1))
    else:
        print_layout(layout, warnings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
