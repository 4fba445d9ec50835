"""Runs a few AIM training steps under one parallel layout and saves what tests compare.

    torchrun --nproc_per_node N tests/dist_worker.py --out OUT.pt [--weights W.pt] key=value ...

Every layout sees the same global batches and (with --weights) the same initial weights, so
losses, gradients and parameters can be compared against a single-process run.
"""
import argparse

import torch
import torch.distributed as dist

from aim_megatron.config import load_config
from aim_megatron.data import prefix_lengths
from aim_megatron.distributed import parallel


def global_batch(cfg, step: int) -> dict:
    m = cfg.model
    g = torch.Generator().manual_seed(1000 + step)
    n = cfg.train.global_batch_size
    return {"images": torch.randn(n, m.in_channels, m.image_size, m.image_size, generator=g),
            "prefix_len": prefix_lengths(cfg.train.seed, torch.arange(step * n, (step + 1) * n), m)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", help="load these full weights (else save the initial ones here)")
    ap.add_argument("--save-weights", help="save the initial full weights to this file")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    cfg = load_config(None, args.overrides)
    world = parallel.initialize(cfg)
    model = parallel.build_model(cfg)
    if args.weights:
        parallel.load_full_state_dict(model, torch.load(args.weights))
    init = parallel.gather_full_state_dict(model)
    if args.save_weights and dist.get_rank() == 0:
        torch.save(init, args.save_weights)
    optimizer = parallel.build_optimizer(cfg, model)

    result = {"loss": [], "grad_norm": [], "grads": None}
    for step in range(args.steps):
        mbs = parallel.split_microbatches(cfg, global_batch(cfg, step), world)
        optimizer.zero_grad()
        loss = parallel.forward_backward(cfg, model, mbs)
        if step == 0 and not cfg.parallel.use_distributed_optimizer:
            # Plain DDP: every rank's main_grad holds the full DP-reduced gradient.
            result["grads"] = parallel.gather_full_state_dict(model, lambda p: p.main_grad)
        ok, grad_norm, _ = optimizer.step()
        assert ok, "optimizer step was skipped"
        result["loss"].append(loss)
        result["grad_norm"].append(float(grad_norm))
    parallel.finish_param_sync(cfg, model)
    result["params"] = parallel.gather_full_state_dict(model)
    if dist.get_rank() == 0:
        torch.save(result, args.out)
    parallel.shutdown()


if __name__ == "__main__":
    main()
