"""Dry-run of a Slurm allocation: resolve and check the TP/PP/VP/DP layout before queueing.

    python tools/slurm_layout.py --preset aim-7B --nodes 8
    python tools/slurm_layout.py --config examples/slurm/configs/aim-3B.yaml --nodes 64 --tp 2
    python tools/slurm_layout.py --preset aim-1B --nodes 4 --gpus-per-node 4 --pp 2 --vp 3 --json
    python tools/slurm_layout.py --preset aim-7B --nodes 512 --recommend

Checks config.validate() for the world size nodes x gpus-per-node, that TP groups stay inside a
node, and megatron-core's interleaved-schedule rule; exits 1 with a message naming the fix when
the layout does not divide. --recommend prints the layout tools/estimate_memory.py --table picks.
Also prints how often a job of this size fails and the checkpoint interval that minimises the time
lost (scaling/checkpoint_interval.py), for a step time given by --step-seconds (else estimated
from --tflops-per-gpu at 45% MFU).
"""
from __future__ import annotations

import argparse
import json
import sys

from aim_megatron.config import ConfigError, num_microbatches, trunk_layers_per_stage
from aim_megatron.scaling import checkpoint_interval, sizing
from aim_megatron.scaling.flops import train_flops_per_image
from aim_megatron.scaling.estimate_memory import add_layout_flags, layout_overrides
from aim_megatron.scaling.sizing import GIB


# For the step time when --step-seconds is not given: an H100's dense bf16 peak at the 45% MFU goal.
DEFAULT_TFLOPS_PER_GPU = 989.0
DEFAULT_MFU = 0.45


def checkpoint_plan(cfg, world: int, step_s: float | None = None,
                    tflops_per_gpu: float = DEFAULT_TFLOPS_PER_GPU) -> checkpoint_interval.IntervalPlan:
    if step_s is None:
        step_flops = train_flops_per_image(cfg.model) * cfg.train.global_batch_size
        step_s = step_flops / (world * tflops_per_gpu * 1e12 * DEFAULT_MFU)
    return checkpoint_interval.plan_interval(cfg, world, step_s)


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
    ap.add_argument("--step-seconds", type=float, default=None,
                    help="measured seconds per step, for the checkpoint interval (default: estimated)")
    ap.add_argument("--tflops-per-gpu", type=float, default=DEFAULT_TFLOPS_PER_GPU,
                    help=f"peak TFLOP/s per GPU for the estimated step time (default "
                         f"{DEFAULT_TFLOPS_PER_GPU:g}, H100 bf16; {DEFAULT_MFU * 100:.0f}%% of it assumed)")
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
        if args.step_seconds is not None and args.step_seconds <= 0:
            raise ConfigError(f"--step-seconds={args.step_seconds}: must be > 0")
        plan = checkpoint_plan(cfg, world, args.step_seconds, args.tflops_per_gpu)
    except ConfigError as exc:
        msg = f"error: layout does not work for {args.nodes} node(s) x {args.gpus_per_node} GPUs: {exc}"
        fix = sizing.micro_batch_fix(cfg, args.nodes * args.gpus_per_node) if cfg else None
        if fix and "global_batch_size" in str(exc):
            msg += f"; for this global batch the largest micro-batch that divides is {fix}"
        print(msg, file=sys.stderr)
        return 1
    failures = {"job_mtbf_hours": plan.mtbf_s / 3600, "save_stall_s": plan.stall_s,
                "step_seconds": plan.step_s, "optimal_save_interval_s": plan.optimal_s,
                "optimal_save_interval_steps": plan.optimal_steps,
                "expected_lost_per_failure_s": plan.lost_per_failure_s if plan.interval_steps else None}
    if args.json:
        print(json.dumps({**layout, "checkpoints": failures, "warnings": warnings}, indent=1))
    else:
        print_layout(layout, warnings)
        for line in checkpoint_interval.describe(plan, world, cfg.train.gpu_mtbf_hours):
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
