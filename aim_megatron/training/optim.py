"""The learning-rate schedule and the optimizer step that refuses non-finite updates."""
from __future__ import annotations

import math

from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from aim_megatron.config import Config

# ml-l3m starts its warmup at 1e-6, not 0: the first step already moves the weights.
WARMUP_START_LR = 1e-6


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """Linear warmup from WARMUP_START_LR over the first warmup_fraction of training, then cosine
    to min_lr (ml-l3m's aim_v1 schedule: LinearParamScheduler(1e-6 -> lr), then cosine)."""
    t = cfg.train
    warmup = int(round(t.warmup_fraction * t.train_iters))
    return OptimizerParamScheduler(
        optimizer, init_lr=min(WARMUP_START_LR, t.effective_lr), max_lr=t.effective_lr, min_lr=t.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=t.train_iters, lr_decay_style="cosine",
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.train_iters,
        wd_incr_style="constant")


def guarded_optimizer_step(optimizer, loss: float) -> tuple[bool, float]:
    """megatron's optimizer step with a finiteness check *before* any update: a NaN/inf loss or
    gradient norm skips the step. Returns (stepped, grad_norm)."""
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not math.isfinite(loss) or not math.isfinite(grad_norm):
        return False, grad_norm
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if opt.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm)
    return bool(optimizer.step_with_ready_grads()), grad_norm
