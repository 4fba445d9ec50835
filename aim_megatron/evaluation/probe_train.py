"""Training and evaluating a probe on cached features: AdamW with warmup and cosine decay, global
batches drawn from one permutation shared by all data-parallel ranks (every rank takes the samples
of the batch that lie in its shard; gradients are summed over the group, so DP=N trains the same
probe as one process), then top-1/top-5 and the confusion matrix over every rank's shard.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from aim_megatron.evaluation.probe import ProbeConfig, all_reduce_sum, is_rank0, set_reduce_group

log = logging.getLogger("aim_megatron.probe")


def lr_at(step: int, total: int, cfg: ProbeConfig) -> float:
    warmup = int(round(cfg.warmup_fraction * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def train_probe(probe: nn.Module, features: torch.Tensor, labels: torch.Tensor, shard_start: int,
                num_total: int, cfg: ProbeConfig, group=None) -> list[float]:
    """AdamW + warmup/cosine on cached features. ``features``/``labels`` are this rank's shard,
    which starts at global sample ``shard_start`` of ``num_total``. Every rank draws the same
    global batches and uses the part in its shard; the loss is summed locally, divided by the
    global batch size and gradients are summed over ``group``, so the update does not depend
    on the number of ranks. Returns the mean training loss of each epoch."""
    set_reduce_group(probe, group)
    probe.train()
    params = [p for p in probe.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]    # weights and the query; not biases
    rest = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    steps_per_epoch = math.ceil(num_total / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    shard_end = shard_start + len(labels)
    history, step = [], 0
    for _ in range(cfg.epochs):
        order = torch.randperm(num_total, generator=g)
        epoch_loss = torch.zeros(2, dtype=torch.float64)
        for i in range(steps_per_epoch):
            batch = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            local = batch[(batch >= shard_start) & (batch < shard_end)] - shard_start
            for group_ in opt.param_groups:
                group_["lr"] = lr_at(step, total_steps, cfg)
            loss_sum = F.cross_entropy(probe(features[local].float()), labels[local], reduction="sum",
                                       label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=False)
            (loss_sum / len(batch)).backward()
            if group is not None:  # one flat all-reduce of every gradient
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                flat = all_reduce_sum(torch.cat([t.reshape(-1) for t in grads]), group)
                for p, piece in zip(params, flat.split([p.numel() for p in params])):
                    p.grad = piece.view_as(p).clone()
            opt.step()
            epoch_loss += torch.tensor([loss_sum.item(), len(local)], dtype=torch.float64)
            step += 1
        all_reduce_sum(epoch_loss, group)
        history.append(float(epoch_loss[0] / epoch_loss[1]))
        if is_rank0():
            log.info("probe epoch %d/%d: train loss %.4f, lr %.2e", len(history), cfg.epochs, history[-1],
                     opt.param_groups[0]["lr"])
    return history


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """How many labels are among the top-k predictions, for each k (k capped at the classes)."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[true class, predicted class] counts."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


@torch.no_grad()
def evaluate(probe: nn.Module, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
             group=None, batch_size: int = 1024) -> dict:
    """Top-1/top-5 accuracy and the confusion matrix over all ranks' shards."""
    probe.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    top5 = 0
    for start in range(0, len(labels), batch_size):
        logits = probe(features[start:start + batch_size].float())
        y = labels[start:start + batch_size]
        cm += confusion_matrix(logits.argmax(dim=1), y, num_classes)
        top5 += topk_correct(logits, y, (5,))[5]
    counts = all_reduce_sum(torch.cat([cm.flatten(), torch.tensor([top5])]), group)
    cm = counts[:-1].view(num_classes, num_classes)
    n = int(cm.sum())
    return {"top1": float(cm.trace()) / max(n, 1), "top5": float(counts[-1]) / max(n, 1),
            "num_samples": n, "confusion_matrix": cm}
