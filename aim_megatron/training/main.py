"""The ``aim-pretrain`` command: arguments, logging, start-up, and which error ends a run how.

    aim-pretrain --config examples/configs/aim_tiny.yaml train.train_iters=200 parallel.tp=2
    torchrun --nproc_per_node 8 -m aim_megatron.train --config ... [--resume auto|none|PATH]

Exit codes (training/exit_codes.py): 0 finished, 3 stopped by SIGTERM/SIGUSR1 after saving a
checkpoint (requeue), 2 diverged (too many NaN/inf steps in a row; nothing poisoned is saved),
1 bad input.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import torch.distributed as dist

from aim_megatron import cli
from aim_megatron import data
from aim_megatron.checkpoint import checkpointer as checkpoint
from aim_megatron.config import ConfigError, load_config, resolve_params_dtype
from aim_megatron.distributed import parallel
from aim_megatron.training.batches import DataError
from aim_megatron.training.exit_codes import EXIT_DIVERGED, EXIT_ERROR
from aim_megatron.training.preemption import die_with_launcher, install_signal_handlers
from aim_megatron.training.run_lock import RunLockError, hold_run_directory
from aim_megatron.training.startup import (checkpoint_plan, measured_matmul_flops, preflight,
                                           settle_save_interval, startup_summary)
from aim_megatron.training.trainer import Trainer, TrainingDiverged

log = logging.getLogger("aim_megatron.train")


def parse_args(argv=None) -> argparse.Namespace:
    ap = cli.ArgumentParser(prog="aim-pretrain", description="Pre-train AIM with megatron-core.")
    ap.add_argument("--config", help="YAML config (see examples/configs/)")
    ap.add_argument("--resume", default="auto",
                    help="'auto' (latest checkpoint in train.output_dir, if any), 'none', or a step_* dir")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. parallel.tp=2")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    previous_handlers = install_signal_handlers()  # first: a signal at start-up is not lost
    die_with_launcher()
    try:
        return _main(argv)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


def _main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its per-parameter INFO lists
    # Errors every rank finds alike (config, data paths) are printed by rank 0 only: one line,
    # not one per process.
    def fail(kind: str, exc: BaseException) -> int:
        if cli.is_rank0():
            print(f"aim-pretrain: {kind}{cli.one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR

    try:
        cfg = load_config(args.config, args.overrides)
        resolve_params_dtype(cfg)   # "auto": this machine's fast dtype, recorded in checkpoints
        cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))  # before any process group exists
        preflight(cfg)
        world = parallel.initialize(cfg)
    except ConfigError as exc:
        parallel.shutdown()
        return fail("configuration error: ", exc)
    except data.DataSourceError as exc:
        return fail("data error: ", exc)
    trainer = writer_lock = None
    try:
        # Before anything is written into train.output_dir: one writer per run directory.
        writer_lock = hold_run_directory(cfg.train.output_dir, cfg.train.lock_timeout_s)
        plan = None
        if dist.get_rank() == 0:  # say what is about to run before the (maybe long) build
            matmul = measured_matmul_flops(params_dtype=cfg.train.params_dtype)
            lines, warning = startup_summary(cfg, world, matmul)
            for line in lines:
                log.info(line)
            if warning:
                log.warning(warning)
            plan = checkpoint_plan(cfg, world, matmul[0])
        settle_save_interval(cfg, world, plan)
        if dist.get_rank() == 0 and plan is not None and cfg.train.save_interval == plan.optimal_steps:
            log.info("train.save_interval: every %d steps", cfg.train.save_interval)
        trainer = Trainer(cfg, world)
        trainer.resume(args.resume)
        return trainer.run()
    except DataError as exc:
        return fail("data error: ", exc)
    except checkpoint.CheckpointError as exc:
        return fail("checkpoint error: ", exc)
    except TrainingDiverged as exc:
        print(f"aim-pretrain: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except RunLockError as exc:
        return fail("", exc)
    finally:
        if trainer is not None:
            trainer.close()
        if writer_lock is not None:
            writer_lock.release()
        parallel.shutdown()


if __name__ == "__main__":
    sys.exit(main())
