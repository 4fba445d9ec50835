"""A run's record, written by rank 0: config.yaml, metrics.jsonl (a window record every
train.log_interval steps with loss, lr, images/s, TFLOP/s per device, MFU and memory; eval records;
a final "complete" record), TensorBoard scalars, the tqdm bar and the log lines. On every other
rank a MetricsLogger does nothing."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from aim_megatron.config import Config
from aim_megatron.scaling.flops import device_peak_tflops, train_flops_per_image
from aim_megatron.models.attention import kernel_self_checks

log = logging.getLogger("aim_megatron.train")

STALLS_FILE = "checkpoint_stalls.jsonl"   # per save: how long training waited for it


def _rss_gb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**30


class MetricsLogger:
    def __init__(self, cfg: Config, world: int, is_logger: bool):
        self.cfg, self.world, self.is_logger = cfg, world, is_logger
        self.out_dir = Path(cfg.train.output_dir)
        self.flops_per_image = train_flops_per_image(cfg.model)
        self.peak_tflops = device_peak_tflops()
        self.file = None
        self.writer = None
        self.progress = None
        self.window: list[dict] = []   # the train_step results since the last window record
        self.window_start = time.perf_counter()

    def open(self) -> None:
        if not self.is_logger:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        self.file = open(self.out_dir / "metrics.jsonl", "a")
        if self.cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))

    def line(self, text: str, level: int = logging.INFO) -> None:
        if self.is_logger:
            log.log(level, text)

    def start_steps(self, step: int) -> None:
        """The loop starts (or resumes) at ``step``: the bar, and the first window's clock."""
        if self.is_logger:
            from tqdm import tqdm
            self.progress = tqdm(total=self.cfg.train.train_iters, initial=step, desc="pretrain",
                                 unit="step", dynamic_ncols=True, file=sys.stderr,
                                 disable=None)  # a bar on terminals; log lines only in batch logs
        self.window, self.window_start = [], time.perf_counter()

    def step_done(self, step: int, result: dict, skipped_steps: int) -> None:
        """After train_step: the bar moves; every train.log_interval steps (and at the last) the
        window's record is written."""
        t = self.cfg.train
        self.window.append(result)
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{result['lr']:.2e}")
        if step % t.log_interval == 0 or step == t.train_iters:
            self._log_window(step, skipped_steps, time.perf_counter() - self.window_start)
            self.window, self.window_start = [], time.perf_counter()

    def end_steps(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def _write(self, record: dict, scalars: bool = True) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None and scalars:
            for key, value in record.items():
                if key not in ("step", "images_seen") and value is not None:
                    self.writer.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss",
                                           value, record["step"])
            self.writer.flush()

    def _log_window(self, step: int, skipped_steps: int, seconds: float) -> None:
        window = self.window
        if not self.is_logger or not window:
            return
        good = [w for w in window if math.isfinite(w["loss"])]
        images_per_s = len(window) * self.cfg.train.global_batch_size / max(seconds, 1e-9)
        tflops = images_per_s * self.flops_per_image / self.world / 1e12  # per device
        record = {
            "step": step,
            "images_seen": step * self.cfg.train.global_batch_size,
            "loss": sum(w["loss"] for w in good) / len(good) if good else float("nan"),
            "lr": window[-1]["lr"],
            "grad_norm": window[-1]["grad_norm"],
            "images_per_s": images_per_s,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "skipped_steps": skipped_steps,
            # fused prefix-causal kernels that failed their first-call self-check and run masked
            "attention_kernel_fallbacks": sum(not c["passed"] for c in kernel_self_checks()),
            "memory_gb": (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
                          else _rss_gb()),
        }
        self._write(record)
        mfu = f" mfu {record['mfu']:.1%}" if record["mfu"] else ""
        log.info("step %d/%d loss %.4f lr %.2e grad %.3f | %.1f img/s %.3f TFLOP/s/dev%s | %.2f GB",
                 step, self.cfg.train.train_iters, record["loss"], record["lr"],
                 record["grad_norm"], images_per_s, tflops, mfu, record["memory_gb"])

    def log_eval(self, step: int, val_loss: Optional[float]) -> None:
        if self.is_logger and val_loss is not None:
            self._write({"step": step, "val_loss": val_loss})
            log.info("step %d validation loss %.4f", step, val_loss)

    def log_checkpoint(self, step: int, stall_s: float, background: bool) -> None:
        """How long training waited for a save (all of the write, or only the snapshot and the
        previous background save's end), in checkpoint_stalls.jsonl: read back at start-up for
        the checkpoint interval."""
        if self.is_logger:
            # A file of its own: metrics.jsonl's readers (plots, sweeps) take any record without
            # an "event" key for a training step.
            with open(self.out_dir / STALLS_FILE, "a") as f:
                f.write(json.dumps({"step": step, "stall_s": stall_s, "background": background}) + "\n")
            log.info("checkpoint of step %d %s: training stalled %.2f s", step,
                     "writing in the background" if background else "written", stall_s)

    def log_complete(self, step: int, skipped_steps: int) -> None:
        """The last record of a finished run (after its final evaluation and checkpoint), so sweeps
        and schedulers need not infer completion from step counts."""
        if self.is_logger:
            self._write({"step": step, "event": "complete",
                         "images_seen": step * self.cfg.train.global_batch_size,
                         "skipped_steps": skipped_steps}, scalars=False)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
