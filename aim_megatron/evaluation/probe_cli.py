"""The ``aim-probe`` command: train and evaluate a probe on a frozen AIM trunk, end to end.

    python -m aim_megatron.probe --checkpoint runs/demo/checkpoints [--random-init] \\
        [--config probe.yaml] [--data fashion-mnist|X.npz|DIR] [--train-data SRC --test-data SRC] \\
        [--train-samples N] [--test-samples N] [--out DIR] [probe.kind=linear parallel.tp=2 ...]
    torchrun --nproc_per_node 4 -m aim_megatron.probe ... parallel.tp=2     # TP=2 x DP=2

Under torchrun each data-parallel rank extracts features of its contiguous shard of the data and
the probe trains on global batches drawn from one permutation shared by all ranks (see
``probe_train``), so DP=N trains the same probe as one process.
Any saved TP/PP layout loads: the trunk is built with parallel.pp=1 and ``checkpoint.load`` reshards.
Images are read by the data path (shards or class-per-folder trees; Fashion-MNIST and .npz arrays too)
and preprocessed as the trainer's validation split; corrupt images are skipped and counted.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from aim_megatron import cli
from aim_megatron.config import ConfigError
from aim_megatron.data.base import shard_bounds
from aim_megatron.evaluation.features import extract_features
from aim_megatron.evaluation.labelled_data import data_specs, open_labelled
from aim_megatron.evaluation.probe import (FEATURE_DTYPES, ProbeConfig, all_reduce_sum, build_probe,
                                           load_probe_config, resolve_layers)
from aim_megatron.evaluation.probe_train import evaluate, train_probe
from aim_megatron.evaluation.report import write_probe_results

log = logging.getLogger("aim_megatron.probe")

TRUNK_LAYOUT = ["parallel.tp=1", "parallel.pp=1", "parallel.vp=null", "parallel.sequence_parallel=false",
                "parallel.trunk_layers_in_last_stage=null", "parallel.use_distributed_optimizer=false",
                "parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false",
                "parallel.recompute_granularity=null", "train.micro_batch_size=1", "train.fp8=null"]


def find_checkpoint(path: str | Path) -> Path:
    """A step_* directory, a checkpoints/ directory (its latest) or a run directory."""
    from aim_megatron.checkpoint import checkpointer as checkpoint
    path = Path(path)
    if (path / checkpoint.META_FILE).exists():
        return path
    for root in (path, path / "checkpoints"):
        if (root / checkpoint.LATEST_FILE).exists():
            return checkpoint.resolve(root, "latest")
    raise checkpoint.CheckpointError(
        f"{path} is not a checkpoint: pass RUN/checkpoints/step_*, RUN/checkpoints or RUN")


def run_probe(cfg, ckpt: Path, probe_cfg: ProbeConfig, specs: dict[str, str], out_dir: Optional[Path],
              train_samples: Optional[int] = None, test_samples: Optional[int] = None,
              random_init: bool = False) -> dict:
    """Build the trunk (loaded from ``ckpt`` unless ``random_init``), cache features, train and
    evaluate the probe; rank 0 writes metrics.json, confusion.png and probe.safetensors to ``out_dir``.
    ``specs``: the data of the "train" and "test" splits (see :func:`open_labelled`)."""
    from megatron.core import parallel_state
    from aim_megatron.checkpoint import checkpointer as checkpoint
    from aim_megatron.distributed import parallel
    m = cfg.model
    layers = resolve_layers(probe_cfg.layers, m)
    images = {split: open_labelled(specs[split], split, cfg, limit)   # fail before the trunk is built
              for split, limit in (("train", train_samples), ("test", test_samples))}
    (trunk,) = parallel.build_model(cfg, wrap_ddp=False)
    if not random_init:
        checkpoint.load(ckpt, cfg, [trunk])
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    group = parallel_state.get_data_parallel_group() if dp_size > 1 else None
    rank0 = dist.get_rank() == 0
    timings: dict[str, float] = {}

    splits, num_corrupt = {}, {}
    t0 = time.perf_counter()
    cache_dir = Path(probe_cfg.feature_cache_dir) if probe_cfg.feature_cache_dir else None
    for split, data in images.items():
        lo, hi = shard_bounds(len(data), dp_rank, dp_size)
        feats, labels, corrupt = extract_features(trunk, data, lo, hi, layers, probe_cfg.feature_batch_size,
                                                  cfg.data.num_workers, mean_tokens=probe_cfg.kind == "linear",
                                                  dtype=FEATURE_DTYPES[probe_cfg.feature_dtype],
                                                  cache_file=cache_dir / f"{split}-rank{dist.get_rank():05d}.npy"
                                                  if cache_dir else None)
        for name in corrupt[:20]:
            log.warning("%s: skipped corrupt image %s", split, name)
        # Corrupt images are dropped, so the split is the concatenation of every rank's good samples:
        # a rank's global offset is the count of good samples on the ranks before it.
        counts = torch.zeros(dp_size + 1, dtype=torch.int64)
        counts[dp_rank], counts[dp_size] = len(labels), len(corrupt)
        all_reduce_sum(counts, group)
        start, total = int(counts[:dp_rank].sum()), int(counts[:dp_size].sum())
        splits[split] = (feats, labels, start, total, data.class_names)
        num_corrupt[split] = int(counts[dp_size])
        if rank0:
            log.info("%s features: %d images of %s (%d on this rank), %d corrupt skipped, layers %s, %s",
                     split, total, data.spec, len(labels), num_corrupt[split], layers, tuple(feats.shape[1:]))
        if total == 0:
            raise FileNotFoundError(f"{data.spec}: no readable {split} images")
    timings["features_s"] = time.perf_counter() - t0
    # Classes: the largest label over every rank's shards (and the dataset's class names).
    all_labels = torch.cat([splits["train"][1], splits["test"][1]])
    top = torch.tensor([int(all_labels.max()) if len(all_labels) else -1])
    if group is not None:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    num_classes = max(int(top), len(splits["train"][4]) - 1) + 1

    probe = build_probe(probe_cfg.kind, m.hidden_size, probe_cfg.num_heads or m.num_heads, num_classes,
                        probe_cfg.seed)
    t0 = time.perf_counter()
    feats, labels, lo, n_train, class_names = splits["train"]
    history = train_probe(probe, feats, labels, lo, n_train, probe_cfg, group)
    timings["train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = evaluate(probe, splits["test"][0], splits["test"][1], num_classes, group)
    timings["eval_s"] = time.perf_counter() - t0

    metrics = {
        "top1": result["top1"], "top5": result["top5"], "num_test": result["num_samples"],
        "num_train": n_train, "num_classes": num_classes, "kind": probe_cfg.kind, "layers": layers,
        "checkpoint": str(ckpt), "random_init": random_init, "data": specs, "num_corrupt": num_corrupt,
        "train_loss_per_epoch": history, "probe_config": dataclasses.asdict(probe_cfg),
        "world_size": dist.get_world_size(), "tp": cfg.parallel.tp, "dp": dp_size,
        "class_names": class_names, "confusion_matrix": result["confusion_matrix"].tolist(),
        "timings": timings,
    }
    if rank0 and out_dir is not None:
        write_probe_results(out_dir, metrics, result["confusion_matrix"], probe, probe_cfg, m)
    return metrics


def parse_args(argv=None) -> argparse.Namespace:
    ap = cli.ArgumentParser(prog="aim-probe", description="Train and evaluate a probe on a frozen AIM trunk.")
    ap.add_argument("--checkpoint", required=True, help="RUN/checkpoints/step_*, RUN/checkpoints or RUN")
    ap.add_argument("--random-init", action="store_true",
                    help="probe a randomly initialised trunk of the checkpoint's architecture (baseline)")
    ap.add_argument("--config", help="YAML file with a 'probe:' section")
    ap.add_argument("--data", default="fashion-mnist",
                    help="'fashion-mnist', an .npz of labelled arrays, or a directory with train/ and test/ "
                         "(or val/) labelled sources: shard directories or class-per-folder image trees")
    ap.add_argument("--train-data", help="labelled source of the training split (shards, .tar, glob, image folder)")
    ap.add_argument("--test-data", help="labelled source of the test split (with --train-data)")
    ap.add_argument("--train-samples", type=int, help="seeded subset of the training split")
    ap.add_argument("--test-samples", type=int, help="seeded subset of the test split")
    ap.add_argument("--out", type=Path, help="output directory (default RUN/probe/<kind>-<layers>)")
    ap.add_argument("overrides", nargs="*", help="probe.key=value, parallel.tp=2, model.backend=local")
    return ap.parse_args(argv)


def default_out_dir(ckpt: Path, probe_cfg: ProbeConfig, random_init: bool) -> Path:
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    layers = probe_cfg.layers if isinstance(probe_cfg.layers, str) else "-".join(map(str, probe_cfg.layers))
    return run / "probe" / f"{probe_cfg.kind}-{layers}{'-random-init' if random_init else ''}"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    from aim_megatron.checkpoint import checkpointer as checkpoint
    from aim_megatron.distributed import parallel
    try:
        for name in ("train_samples", "test_samples"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1 "
                                  f"(leave it out to use the whole split)")
        probe_cfg, trunk_overrides = load_probe_config(args.config, args.overrides)
        ckpt = find_checkpoint(args.checkpoint)
        cfg = checkpoint.config_from_checkpoint(ckpt, TRUNK_LAYOUT + trunk_overrides)
        if cfg.parallel.pp != 1 or cfg.parallel.vp is not None:
            raise ConfigError("the probe needs the whole trunk on every rank: keep parallel.pp=1 "
                              "(a checkpoint saved with any pipeline layout loads into it)")
        resolve_layers(probe_cfg.layers, cfg.model)  # fail before starting processes
        if probe_cfg.num_heads and cfg.model.hidden_size % probe_cfg.num_heads:
            raise ConfigError(f"probe.num_heads={probe_cfg.num_heads} does not divide the trunk width "
                              f"{cfg.model.hidden_size}")
        specs = data_specs(args.data, args.train_data, args.test_data)
        parallel.initialize(cfg)
    except (ConfigError, checkpoint.CheckpointError, FileNotFoundError) as exc:
        print(f"aim-probe: {exc}", file=sys.stderr)
        return 1
    def body() -> None:
        out = args.out or default_out_dir(ckpt, probe_cfg, args.random_init)
        metrics = run_probe(cfg, ckpt, probe_cfg, specs, out, args.train_samples,
                            args.test_samples, args.random_init)
        if dist.get_rank() == 0:
            print(f"{probe_cfg.kind} probe, layers {metrics['layers']}"
                  f"{', random-init trunk' if args.random_init else ''}: top-1 {metrics['top1']:.4f} "
                  f"top-5 {metrics['top5']:.4f} on {metrics['num_test']} test images "
                  f"({metrics['num_train']} train) -> {out}")

    return parallel.run_cli("aim-probe", body, (ConfigError, checkpoint.CheckpointError, FileNotFoundError))
