"""Frozen-trunk probes for AIM: the paper's attentive probe and a linear probe on averaged tokens.

    python -m aim_megatron.probe --checkpoint runs/demo/checkpoints [--random-init] \\
        [--config probe.yaml] [--data fashion-mnist] [--train-samples N] [--test-samples N] \\
        [--out DIR] [probe.kind=linear probe.layers=best parallel.tp=2 ...]
    torchrun --nproc_per_node 4 -m aim_megatron.probe ... parallel.tp=2     # TP=2 x DP=2

Features are the mean of raw trunk block outputs (``AIMModel.block_features``, bidirectional
attention) over a layer set: "last" (last 6 blocks), "best" (the paper's blocks for the official
presets) or explicit 0-based indices. They are computed once with the frozen trunk and cached in
memory (fine for small data: N x tokens x D floats; the linear probe caches the token mean only).
Under torchrun each data-parallel rank extracts features of its contiguous shard of the data and
the probe trains on global batches drawn from one permutation shared by all ranks: every rank
takes the samples of the batch that lie in its shard, BatchNorm statistics and gradients are
summed over the data-parallel group, so DP=N trains the same probe as one process.
Any saved TP/PP layout loads: the trunk is built with parallel.pp=1 and ``checkpoint.load`` reshards.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

from .config import BEST_PROBE_LAYERS, PRESETS, ConfigError, DataConfig, ModelConfig, _coerce

log = logging.getLogger("aim_megatron.probe")

PROBE_FORMAT = 1
NUM_PROBE_BLOCKS = 6        # the paper averages 6 blocks
BEST_END_BEFORE_LAST = 4    # generic "best": 6 blocks ending 4 before the last (aim-600M's pattern)


# --------------------------------------------------------------------------- config

@dataclass
class ProbeConfig:
    kind: str = "attentive"                   # "attentive" (paper) or "linear" (token mean)
    layers: Union[str, list[int]] = "last"    # "last", "best" or 0-based block indices
    epochs: int = 20
    batch_size: int = 256                     # global, over all data-parallel ranks
    lr: float = 1e-2                          # AdamW; best of 1e-3..3e-2 on 2k Fashion-MNIST images
    min_lr: float = 0.0
    warmup_fraction: float = 0.05             # linear warmup, then cosine to min_lr
    weight_decay: float = 0.05                # on weight matrices and the query only
    label_smoothing: float = 0.1
    seed: int = 0
    feature_batch_size: int = 256             # images per trunk forward while caching features

    def validate(self) -> "ProbeConfig":
        problems = []
        if self.kind not in ("attentive", "linear"):
            problems.append(f"probe.kind={self.kind!r}: use 'attentive' or 'linear'")
        if min(self.epochs, self.batch_size, self.feature_batch_size) < 1:
            problems.append("probe.epochs, probe.batch_size and probe.feature_batch_size must be >= 1")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            problems.append("probe.lr must be > 0 and probe.min_lr within [0, lr]")
        if not 0 <= self.warmup_fraction <= 1 or not 0 <= self.label_smoothing < 1:
            problems.append("probe.warmup_fraction must be in [0, 1] and probe.label_smoothing in [0, 1)")
        if problems:
            raise ConfigError("; ".join(problems))
        return self


def _layers_value(raw: Any) -> Union[str, list[int]]:
    """'last' / 'best' / [i, ...] from YAML or the command line (also '3' and '2,3,4')."""
    if isinstance(raw, str) and raw.strip() in ("last", "best"):
        return raw.strip()
    items = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, list) else [raw]
    try:
        out = [int(str(v).strip()) for v in items]
    except ValueError:
        out = []
    if not out or any(isinstance(v, (bool, float)) for v in items):
        raise ConfigError(f"probe.layers={raw!r}: use 'last', 'best' or a list of 0-based block "
                          f"indices such as [8, 9, 10]")
    return out


def probe_config_from_dict(values: Optional[dict]) -> ProbeConfig:
    known = {f.name: f.type for f in dataclasses.fields(ProbeConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in (values or {}).items():
        if key not in known:
            raise ConfigError(f"probe.{key}: unknown field; valid fields are {', '.join(sorted(known))}")
        typ = {"str": str, "int": int, "float": float}.get(known[key])
        kwargs[key] = _layers_value(value) if key == "layers" else _coerce(value, typ, f"probe.{key}")
    return ProbeConfig(**kwargs).validate()


def load_probe_config(path: Optional[str | Path], overrides: Sequence[str] = ()
                      ) -> tuple[ProbeConfig, list[str]]:
    """A ``probe:`` section from YAML plus ``probe.key=value`` overrides. Other overrides
    (``parallel.tp=2``, ``model.backend=local``) are returned for the trunk's config."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"probe config {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict) or set(data) - {"probe"}:
            raise ConfigError(f"{path} must hold one mapping named 'probe' (got {sorted(data)})")
        values = dict(data.get("probe") or {})
    trunk_overrides = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. probe.epochs=20")
        if key.startswith("probe."):
            values[key[len("probe."):]] = yaml.safe_load(raw)
        else:
            trunk_overrides.append(item)
    return probe_config_from_dict(values), trunk_overrides


def resolve_layers(spec: Union[str, Sequence[int]], model: ModelConfig) -> list[int]:
    """0-based trunk blocks for a layer spec. "best" uses the paper's blocks for an official
    preset; for any other trunk it is the 6 blocks ending 4 before the last (aim-600M's
    pattern, 14..19 of 24), clamped to block 0 for shallow trunks."""
    depth = model.num_layers
    if spec == "last":
        return list(range(max(0, depth - NUM_PROBE_BLOCKS), depth))
    if spec == "best":
        preset = model.preset
        if preset in BEST_PROBE_LAYERS and PRESETS[preset]["num_layers"] == depth:
            return list(BEST_PROBE_LAYERS[preset])
        end = max(0, depth - 1 - BEST_END_BEFORE_LAST)
        return list(range(max(0, end - NUM_PROBE_BLOCKS + 1), end + 1))
    if isinstance(spec, str):
        spec = _layers_value(spec)
    layers = sorted(set(int(i) for i in spec))
    bad = [i for i in layers if not 0 <= i < depth]
    if bad or not layers:
        raise ConfigError(f"probe.layers {list(spec)}: the trunk has {depth} blocks, valid 0-based "
                          f"indices are 0..{depth - 1} (or 'last' / 'best')")
    return layers


# --------------------------------------------------------------------------- probe heads

def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d(D, affine=False, eps=1e-6) over every token of the batch ([..., D] input).

    Batch statistics are summed over ``group`` (the data-parallel group) so DP=N normalizes like
    one process. The inputs are frozen features: the statistics carry no gradient.
    """

    def __init__(self, dim: int):
        super().__init__(dim, eps=1e-6, affine=False)
        self.group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.training:
            with torch.no_grad():
                sums = torch.cat([flat.sum(0), flat.new_tensor([flat.shape[0]])])
                _all_reduce(sums, self.group)
                count = sums[-1]
                mean = sums[:-1] / count
                var = _all_reduce(((flat - mean) ** 2).sum(0), self.group) / count
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * var * count / (count - 1).clamp(min=1))
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        return ((flat - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)


class AttentiveProbe(nn.Module):
    """The AIM attentive probe: BN on tokens, one learned query attending to k/v projections of
    the tokens per head (no q or output projection), then a linear classifier. Parameter names
    follow the released ``head.*`` keys."""

    def __init__(self, dim: int, num_heads: int, num_classes: int, seed: int = 0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"probe width {dim} is not divisible by {num_heads} heads")
        g = torch.Generator().manual_seed(seed)  # same init on every rank, whatever the global RNG
        self.num_heads = num_heads
        self.bn = TokenBatchNorm(dim)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim, generator=g))
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes)
        _init_linears(self, g)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.bn(tokens)
        b, n, d = x.shape
        heads = lambda t: t.reshape(b, -1, self.num_heads, d // self.num_heads).transpose(1, 2)
        query = heads(self.cls_token.expand(b, 1, d))
        pooled = F.scaled_dot_product_attention(query, heads(self.k(x)), heads(self.v(x)))
        return self.linear(pooled.transpose(1, 2).reshape(b, d))


class LinearProbe(nn.Module):
    """BN (no affine) then a linear classifier on the mean token. Accepts [b, N, D] tokens or
    already-averaged [b, D] features."""

    def __init__(self, dim: int, num_classes: int, seed: int = 0):
        super().__init__()
        self.bn = TokenBatchNorm(dim)
        self.linear = nn.Linear(dim, num_classes)
        _init_linears(self, torch.Generator().manual_seed(seed))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 3:
            features = features.mean(dim=1)
        return self.linear(self.bn(features))


def _init_linears(module: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for lin in module.modules():
            if isinstance(lin, nn.Linear):
                lin.weight.copy_(0.02 * torch.randn(lin.weight.shape, generator=g))
                if lin.bias is not None:
                    lin.bias.zero_()


def build_probe(kind: str, dim: int, num_heads: int, num_classes: int, seed: int = 0) -> nn.Module:
    if kind == "attentive":
        return AttentiveProbe(dim, num_heads, num_classes, seed)
    if kind == "linear":
        return LinearProbe(dim, num_classes, seed)
    raise ConfigError(f"probe.kind={kind!r}: use 'attentive' or 'linear'")


def set_reduce_group(probe: nn.Module, group) -> None:
    for m in probe.modules():
        if isinstance(m, TokenBatchNorm):
            m.group = group


# --------------------------------------------------------------------------- training / metrics

def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """The contiguous slice of n samples that data-parallel rank ``rank`` of ``size`` holds."""
    return n * rank // size, n * (rank + 1) // size


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
            loss_sum = F.cross_entropy(probe(features[local]), labels[local], reduction="sum",
                                       label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=False)
            (loss_sum / len(batch)).backward()
            if group is not None:  # one flat all-reduce of every gradient
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                flat = _all_reduce(torch.cat([t.reshape(-1) for t in grads]), group)
                for p, piece in zip(params, flat.split([p.numel() for p in params])):
                    p.grad = piece.view_as(p).clone()
            opt.step()
            epoch_loss += torch.tensor([loss_sum.item(), len(local)], dtype=torch.float64)
            step += 1
        _all_reduce(epoch_loss, group)
        history.append(float(epoch_loss[0] / epoch_loss[1]))
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
        logits = probe(features[start:start + batch_size])
        y = labels[start:start + batch_size]
        cm += confusion_matrix(logits.argmax(dim=1), y, num_classes)
        top5 += topk_correct(logits, y, (5,))[5]
    counts = _all_reduce(torch.cat([cm.flatten(), torch.tensor([top5])]), group)
    cm = counts[:-1].view(num_classes, num_classes)
    n = int(cm.sum())
    return {"top1": float(cm.trace()) / max(n, 1), "top5": float(counts[-1]) / max(n, 1),
            "num_samples": n, "confusion_matrix": cm}


# --------------------------------------------------------------------------- data adapter
# Labelled uint8 arrays -> model inputs. Small and separate so the shared data path
# (aim_megatron/data.py) can replace it.

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]


@dataclass
class LabelledImages:
    images: np.ndarray          # uint8 [N, H, W] (grayscale) or [N, H, W, 3]
    labels: np.ndarray          # int64 [N]
    class_names: list[str] = field(default_factory=list)


def load_labelled(spec: str, split: str, max_samples: Optional[int] = None,
                  subset_seed: int = 0) -> LabelledImages:
    """``spec`` is "fashion-mnist" (Debian dataset-fashion-mnist) or an .npz file holding
    {train,test}_images (uint8) and {train,test}_labels (+ optional class_names). With
    ``max_samples`` a fixed seeded subset is taken (the same for every probe run)."""
    if spec == "fashion-mnist":
        from .data_shards import read_idx
        prefix = "train" if split == "train" else "t10k"
        files = [FASHION_MNIST_DIR / f"{prefix}-{kind}-idx{d}-ubyte.gz" for kind, d in (("images", 3), ("labels", 1))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]} is missing; install it with "
                                    f"`apt-get install -y dataset-fashion-mnist`")
        data = LabelledImages(read_idx(files[0]), read_idx(files[1]).astype(np.int64),
                              list(FASHION_MNIST_CLASSES))
    else:
        path = Path(spec)
        if path.suffix != ".npz" or not path.is_file():
            raise FileNotFoundError(f"--data {spec}: use 'fashion-mnist' or an existing .npz file with "
                                    f"train_images/train_labels/test_images/test_labels")
        arrays = np.load(path, allow_pickle=False)
        names = [str(c) for c in arrays["class_names"]] if "class_names" in arrays else []
        data = LabelledImages(arrays[f"{split}_images"], arrays[f"{split}_labels"].astype(np.int64), names)
    if max_samples is not None and max_samples < len(data.labels):
        keep = np.sort(np.random.default_rng(subset_seed).permutation(len(data.labels))[:max_samples])
        data = LabelledImages(data.images[keep], data.labels[keep], data.class_names)
    return data


def to_model_input(images: np.ndarray, model: ModelConfig, data: DataConfig) -> torch.Tensor:
    """uint8 [b, H, W(, 3)] -> float [b, C, S, S]: channels matched to the model, resized to its
    image size (bilinear, antialiased) and normalized as in pre-training."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] != model.in_channels:
        x = x.mean(dim=1, keepdim=True) if model.in_channels == 1 else x[:, :1].expand(-1, model.in_channels, -1, -1)
    if x.shape[-2:] != (model.image_size, model.image_size):
        x = F.interpolate(x, size=(model.image_size, model.image_size), mode="bilinear",
                          align_corners=False, antialias=True)
    mean, std = data.normalization(model.in_channels)
    return (x - torch.tensor(mean)[None, :, None, None]) / torch.tensor(std)[None, :, None, None]


# --------------------------------------------------------------------------- features

@torch.no_grad()
def extract_features(trunk, images: np.ndarray, layers: list[int], model: ModelConfig,
                     data: DataConfig, batch_size: int, mean_tokens: bool = False) -> torch.Tensor:
    """Cached frozen-trunk features [n, N, D] (or the token mean [n, D]) of uint8 images.
    Collective over the tensor-parallel group: its ranks must pass the same images."""
    from . import cpu_shims
    trunk.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start:start + batch_size], model, data).to(cpu_shims.device())
        feats = trunk.block_features(x, layers).cpu()
        out.append(feats.mean(dim=1) if mean_tokens else feats)
    if not out:
        shape = (0, model.hidden_size) if mean_tokens else (0, model.num_patches, model.hidden_size)
        return torch.zeros(shape)
    return torch.cat(out)


# --------------------------------------------------------------------------- outputs

def save_probe(path: str | Path, probe: nn.Module, cfg: ProbeConfig, layers: list[int],
               model: ModelConfig, class_names: list[str], metrics: Optional[dict] = None) -> None:
    torch.save({"format": PROBE_FORMAT, "kind": cfg.kind, "layers": layers,
                "probe_config": dataclasses.asdict(cfg), "model": dataclasses.asdict(model),
                "num_classes": probe.linear.out_features, "class_names": class_names,
                "state_dict": probe.state_dict(), "metrics": metrics or {}}, path)


def load_probe(path: str | Path) -> tuple[nn.Module, dict]:
    """(probe in eval mode, the saved record) of a ``save_probe`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probe checkpoint {path} does not exist")
    record = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(record, dict) or record.get("format") != PROBE_FORMAT:
        raise ValueError(f"{path} is not an aim-megatron probe checkpoint (see probe.save_probe)")
    m = record["model"]
    probe = build_probe(record["kind"], m["hidden_size"], m["num_heads"], record["num_classes"])
    probe.load_state_dict(record["state_dict"])
    return probe.eval(), record


def save_confusion_png(cm: torch.Tensor, class_names: list[str], path: str | Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c = cm.shape[0]
    names = class_names if len(class_names) == c else [str(i) for i in range(c)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * c, 0.8 + 0.55 * c))
    ax.imshow(cm.numpy(), cmap="Blues")
    ax.set(xticks=range(c), yticks=range(c), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    if c <= 30:
        top = cm.max().item()
        for i in range(c):
            for j in range(c):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- end to end

# The probe needs the whole trunk on each rank; any saved layout reshards into this one.
TRUNK_LAYOUT = ["parallel.tp=1", "parallel.pp=1", "parallel.vp=null", "parallel.sequence_parallel=false",
                "parallel.trunk_layers_in_last_stage=null", "parallel.use_distributed_optimizer=false",
                "parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false",
                "parallel.recompute_granularity=null", "train.micro_batch_size=1", "train.fp8=null"]


def find_checkpoint(path: str | Path) -> Path:
    """A step_* directory, a checkpoints/ directory (its latest) or a run directory."""
    from . import checkpoint
    path = Path(path)
    if (path / checkpoint.META_FILE).exists():
        return path
    for root in (path, path / "checkpoints"):
        if (root / checkpoint.LATEST_FILE).exists():
            return checkpoint.resolve(root, "latest")
    raise checkpoint.CheckpointError(
        f"{path} is not a checkpoint: pass RUN/checkpoints/step_*, RUN/checkpoints or RUN")


def run_probe(cfg, ckpt: Path, probe_cfg: ProbeConfig, data_spec: str, out_dir: Optional[Path],
              train_samples: Optional[int] = None, test_samples: Optional[int] = None,
              random_init: bool = False) -> dict:
    """Build the trunk (loaded from ``ckpt`` unless ``random_init``), cache features, train and
    evaluate the probe; rank 0 writes metrics.json, confusion.png and probe.pt to ``out_dir``."""
    from megatron.core import parallel_state
    from . import checkpoint, parallel
    m = cfg.model
    layers = resolve_layers(probe_cfg.layers, m)
    (trunk,) = parallel.build_model(cfg, wrap_ddp=False)
    if not random_init:
        checkpoint.load(ckpt, cfg, [trunk])
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    group = parallel_state.get_data_parallel_group() if dp_size > 1 else None
    rank0 = dist.get_rank() == 0
    timings: dict[str, float] = {}

    splits = {}
    t0 = time.perf_counter()
    for split, limit in (("train", train_samples), ("test", test_samples)):
        data = load_labelled(data_spec, split, limit)
        lo, hi = shard_bounds(len(data.labels), dp_rank, dp_size)
        feats = extract_features(trunk, data.images[lo:hi], layers, m, cfg.data,
                                 probe_cfg.feature_batch_size, mean_tokens=probe_cfg.kind == "linear")
        splits[split] = (feats, torch.from_numpy(data.labels[lo:hi]), lo, len(data.labels), data.class_names)
        if rank0:
            log.info("%s features: %d images (%d on this rank), layers %s, %s", split, len(data.labels),
                     hi - lo, layers, tuple(feats.shape[1:]))
    timings["features_s"] = time.perf_counter() - t0
    # Classes: the largest label over every rank's shards (and the dataset's class names).
    all_labels = torch.cat([splits["train"][1], splits["test"][1]])
    top = torch.tensor([int(all_labels.max()) if len(all_labels) else -1])
    if group is not None:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    num_classes = max(int(top), len(splits["train"][4]) - 1) + 1

    probe = build_probe(probe_cfg.kind, m.hidden_size, m.num_heads, num_classes, probe_cfg.seed)
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
        "checkpoint": str(ckpt), "random_init": random_init, "data": data_spec,
        "train_loss_per_epoch": history, "probe_config": dataclasses.asdict(probe_cfg),
        "world_size": dist.get_world_size(), "tp": cfg.parallel.tp, "dp": dp_size,
        "class_names": class_names, "confusion_matrix": result["confusion_matrix"].tolist(),
        "timings": timings,
    }
    if rank0 and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        title = (f"{probe_cfg.kind} probe{' (random-init trunk)' if random_init else ''}: "
                 f"top-1 {result['top1']:.1%}")
        save_confusion_png(result["confusion_matrix"], class_names, out_dir / "confusion.png", title)
        summary = {k: metrics[k] for k in ("top1", "top5", "num_train", "num_test")}
        save_probe(out_dir / "probe.pt", probe, probe_cfg, layers, m, class_names, summary)
    return metrics


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="aim-probe", description="Train and evaluate a probe on a frozen AIM trunk.")
    ap.add_argument("--checkpoint", required=True, help="RUN/checkpoints/step_*, RUN/checkpoints or RUN")
    ap.add_argument("--random-init", action="store_true",
                    help="probe a randomly initialised trunk of the checkpoint's architecture (baseline)")
    ap.add_argument("--config", help="YAML file with a 'probe:' section")
    ap.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or an .npz of labelled arrays")
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
    from . import checkpoint, parallel
    try:
        probe_cfg, trunk_overrides = load_probe_config(args.config, args.overrides)
        ckpt = find_checkpoint(args.checkpoint)
        cfg = checkpoint.config_from_checkpoint(ckpt, TRUNK_LAYOUT + trunk_overrides)
        if cfg.parallel.pp != 1 or cfg.parallel.vp is not None:
            raise ConfigError("the probe needs the whole trunk on every rank: keep parallel.pp=1 "
                              "(a checkpoint saved with any pipeline layout loads into it)")
        resolve_layers(probe_cfg.layers, cfg.model)  # fail before starting processes
        parallel.initialize(cfg)
    except (ConfigError, checkpoint.CheckpointError, FileNotFoundError) as exc:
        print(f"aim-probe: {exc}", file=sys.stderr)
        return 1
    def body() -> None:
        out = args.out or default_out_dir(ckpt, probe_cfg, args.random_init)
        metrics = run_probe(cfg, ckpt, probe_cfg, args.data, out, args.train_samples,
                            args.test_samples, args.random_init)
        if dist.get_rank() == 0:
            print(f"{probe_cfg.kind} probe, layers {metrics['layers']}"
                  f"{', random-init trunk' if args.random_init else ''}: top-1 {metrics['top1']:.4f} "
                  f"top-5 {metrics['top5']:.4f} on {metrics['num_test']} test images "
                  f"({metrics['num_train']} train) -> {out}")

    return parallel.run_cli("aim-probe", body, (ConfigError, checkpoint.CheckpointError, FileNotFoundError))

if __name__ == "__main__":
    sys.exit(main())
