"""ml-l3m's aim_v1 pre-training recipe, written out from its config (configs/aimv1/001_aim_v1_600M.yaml),
against our scheduler: fvcore CompositeParamScheduler of LinearParamScheduler(1e-6 -> lr) over the
first 2.5% and CosineParamScheduler(lr -> 0) over the rest, both "rescaled", evaluated at
where = step / total_steps before each step."""
import math

import torch

from aim_megatron.config import load_config
from aim_megatron.train import build_scheduler
from conftest import TINY


def official_lr(step: int, total: int, lr: float, warmup_frac: float = 0.025, start: float = 1e-6) -> float:
    where = step / total
    if where < warmup_frac:  # LinearParamScheduler, rescaled to its own [0, 1)
        return start + (where / warmup_frac) * (lr - start)
    local = (where - warmup_frac) / (1 - warmup_frac)  # CosineParamScheduler, end_value 0
    return 0.5 * lr * (1 + math.cos(math.pi * local))


def test_schedule_is_ml_l3m_aim_v1(one_thread):
    total = 400  # warmup 2.5% = 10 steps exactly, as fvcore's fractions
    cfg = load_config(None, [*TINY, f"train.train_iters={total}", "train.lr=1e-3", "train.scale_lr=false",
                             "train.warmup_fraction=0.025", "train.min_lr=0"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = build_scheduler(cfg, opt)
    for step in range(total):
        ours = opt.param_groups[0]["lr"]
        assert math.isclose(ours, official_lr(step, total, 1e-3), rel_tol=1e-9, abs_tol=1e-12), step
        sched.step(1)
    assert opt.param_groups[0]["lr"] == 0.0 or opt.param_groups[0]["lr"] < 1e-9
