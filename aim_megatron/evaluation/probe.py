"""Frozen-trunk probes for AIM: the paper's attentive probe and a linear probe on averaged tokens.

    python -m aim_megatron.probe --checkpoint runs/demo/checkpoints [--random-init] \\
        [--config probe.yaml] [--data fashion-mnist|X.npz|DIR] [--train-data SRC --test-data SRC] \\
        [--train-samples N] [--test-samples N] [--out DIR] [probe.kind=linear parallel.tp=2 ...]
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
Images are read by the data path (shards or class-per-folder trees; Fashion-MNIST and .npz arrays too)
and preprocessed as the trainer's validation split; corrupt images are skipped and counted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from aim_megatron import cli
from aim_megatron.config import (BEST_PROBE_LAYERS, PRESETS, ConfigError, ModelConfig, _coerce, parse_value,
                     read_yaml_file)

log = logging.getLogger("aim_megatron.probe")

PROBE_FORMAT = 1
NUM_PROBE_BLOCKS = 6        # the paper averages 6 blocks
FEATURE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
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
    feature_dtype: str = "float32"            # cached features: float32, or bfloat16 for half the memory
    feature_cache_dir: Optional[str] = None   # cache features in memory-mapped files here, not in RAM
    # Attention heads of the attentive probe; None = the trunk's heads (the paper). Each head pools
    # the tokens with its own attention map, so a narrow trunk with few heads pools few spatial
    # summaries (docs/probe.md: 4 -> 16 heads is +3 points on the Fashion-MNIST demo).
    num_heads: Optional[int] = None

    def validate(self) -> "ProbeConfig":
        problems = []
        if self.kind not in ("attentive", "linear"):
            problems.append(f"probe.kind={self.kind!r}: use 'attentive' or 'linear'")
        if min(self.epochs, self.batch_size, self.feature_batch_size) < 1:
            problems.append("probe.epochs, probe.batch_size and probe.feature_batch_size must be >= 1")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            problems.append("probe.lr must be > 0 and probe.min_lr within [0, lr]")
        if self.num_heads is not None and self.num_heads < 1:
            problems.append(f"probe.num_heads={self.num_heads}: use a positive divisor of the trunk width, or null")
        if self.feature_dtype not in FEATURE_DTYPES:
            problems.append(f"probe.feature_dtype={self.feature_dtype!r}: use {' or '.join(FEATURE_DTYPES)}")
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
        typ = {"str": str, "int": int, "float": float, "Optional[str]": Optional[str],
               "Optional[int]": Optional[int]}.get(known[key])
        kwargs[key] = _layers_value(value) if key == "layers" else _coerce(value, typ, f"probe.{key}")
    return ProbeConfig(**kwargs).validate()


def load_probe_config(path: Optional[str | Path], overrides: Sequence[str] = ()
                      ) -> tuple[ProbeConfig, list[str]]:
    """A ``probe:`` section from YAML plus ``probe.key=value`` overrides. Other overrides
    (``parallel.tp=2``, ``model.backend=local``) are returned for the trunk's config."""
    values: dict = {}
    if path is not None:
        data = read_yaml_file(path, "probe config") or {}
        if not isinstance(data, dict) or set(data) - {"probe"} or not isinstance(data.get("probe") or {}, dict):
            raise ConfigError(f"probe config {path} must hold one mapping named 'probe' "
                              f"(probe: {{kind: attentive, ...}}), got {data!r:.80}")
        values = dict(data.get("probe") or {})
    trunk_overrides = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. probe.epochs=20")
        if key.startswith("probe."):
            values[key[len("probe."):]] = parse_value(item, raw)
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

def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


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
    the tokens per head (no q or output projection), then a linear classifier without bias.
    Parameter names follow the released ``head.*`` keys."""

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
        # No bias: the official AttentionPoolingClassifier has linear_bias=False, and released
        # head.* weights (cls_token, k, v, linear.weight, bn buffers) load strictly.
        self.linear = nn.Linear(dim, num_classes, bias=False)
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
            loss_sum = F.cross_entropy(probe(features[local].float()), labels[local], reduction="sum",
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
        if _is_rank0():
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
    counts = _all_reduce(torch.cat([cm.flatten(), torch.tensor([top5])]), group)
    cm = counts[:-1].view(num_classes, num_classes)
    n = int(cm.sum())
    return {"top1": float(cm.trace()) / max(n, 1), "top5": float(counts[-1]) / max(n, 1),
            "num_samples": n, "confusion_matrix": cm}


# --------------------------------------------------------------------------- data
# Labelled images, decoded and preprocessed exactly as the trainer's validation split
# (data_torch.augment with train=False: centered square, bicubic resize, normalization).

class LabelledImages(torch.utils.data.Dataset):
    """One split of labelled images: item i -> (model input [C, S, S] or None if the image is
    corrupt, label, name). ``read(j)`` gives (PIL image or None, label, name) of sample j of the
    underlying data; ``indices`` picks the samples (all, or a fixed seeded subset)."""

    def __init__(self, spec: str, read, indices: np.ndarray, class_names: list[str], cfg):
        self.spec, self.read, self.indices, self.class_names, self.cfg = spec, read, indices, class_names, cfg

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        from aim_megatron.data.pil import augment
        img, label, name = self.read(int(self.indices[i]))
        if img is None:
            return None, label, name
        return augment(img, np.random.default_rng(0), self.cfg, train=False), label, name


class _ArrayReader:
    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __call__(self, j: int):
        from PIL import Image
        return Image.fromarray(np.ascontiguousarray(self.images[j])), int(self.labels[j]), f"#{j}"


class _SourceReader:
    """Samples of a data-path source (shards or a class-per-folder image tree) by index."""

    def __init__(self, source):
        from aim_megatron.data.pil import SampleTable
        self.table = SampleTable(source)

    def __call__(self, j: int):
        import io
        from PIL import Image
        data, label, name = self.table.get(j)
        if not data:
            return None, label, name
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception:  # truncated, not an image: PIL raises OSError, SyntaxError, ValueError, ...
            return None, label, name
        return img, label, name


def split_spec(data_spec: str, split: str) -> str:
    """The source of one split: ``DIR/train`` for "train"; ``DIR/test`` or else ``DIR/val`` for "test"."""
    names = ["train"] if split == "train" else ["test", "val"]
    for name in names:
        if (Path(data_spec) / name).exists():
            return str(Path(data_spec) / name)
    raise FileNotFoundError(f"--data {data_spec}: no {' or '.join(names)} sub-folder; give a directory "
                            f"with train/ and test/ (or val/) splits, or --train-data and --test-data")


def open_labelled(spec: str, split: str, cfg, max_samples: Optional[int] = None,
                  subset_seed: int = 0) -> LabelledImages:
    """``spec``: "fashion-mnist" (Debian dataset-fashion-mnist), an .npz holding {split}_images
    (uint8 [N, H, W(, 3)]), {split}_labels (+ optional class_names), or any labelled source of the
    data path: a shard directory / .tar / glob with .cls labels or an image folder with one
    sub-folder per class. With ``max_samples`` a fixed seeded subset is taken (the same every run)."""
    if spec == "fashion-mnist":
        from aim_megatron.data.local_datasets import FASHION_MNIST_CLASSES, fashion_mnist
        images, labels = fashion_mnist(split)
        read, n, names = _ArrayReader(images, labels), len(labels), list(FASHION_MNIST_CLASSES)
    elif spec.endswith(".npz"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"{spec} does not exist; an .npz needs train_images/train_labels/"
                                    f"test_images/test_labels (uint8 images, integer labels)")
        arrays = np.load(spec, allow_pickle=False)
        missing = [k for k in (f"{split}_images", f"{split}_labels") if k not in arrays]
        if missing:
            raise FileNotFoundError(f"{spec} has no {' or '.join(missing)}; it holds {', '.join(arrays.files)}")
        labels = arrays[f"{split}_labels"].astype(np.int64)
        names = [str(c) for c in arrays["class_names"]] if "class_names" in arrays else []
        read, n = _ArrayReader(arrays[f"{split}_images"], labels), len(labels)
    else:
        from aim_megatron.data import resolve_source
        try:
            # The probe's sources come from options, not from data.train_sources.
            source = resolve_source(spec, f"the probe's {split} data (--data or --{split}-data)")
        except ValueError as exc:
            raise FileNotFoundError(str(exc)) from None
        if not source.has_labels:
            raise FileNotFoundError(f"{spec} has no labels: the probe needs class sub-folders (image "
                                    f"folder) or .cls entries (shards, tools/make_shards.py)")
        read, n, names = _SourceReader(source), source.num_samples, list(source.classes)
    indices = np.arange(n)
    if max_samples is not None and max_samples < n:
        indices = np.sort(np.random.default_rng(subset_seed).permutation(n)[:max_samples])
    return LabelledImages(spec, read, indices, names, cfg)


def _collate_good(items: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    good = [it for it in items if it[0] is not None]
    images = torch.stack([it[0] for it in good]) if good else None
    return images, torch.tensor([it[1] for it in good], dtype=torch.int64), [it[2] for it in items if it[0] is None]


# --------------------------------------------------------------------------- features

@torch.no_grad()
def extract_features(trunk, images: LabelledImages, lo: int, hi: int, layers: list[int],
                     batch_size: int, num_workers: int = 0, mean_tokens: bool = False,
                     dtype: torch.dtype = torch.float32, cache_file: Optional[Path] = None
                     ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Frozen-trunk features of items [lo, hi): ([n, N, D] or the token mean [n, D] in ``dtype``,
    labels [n], names of corrupt images, which are skipped). Collective over the tensor-parallel
    group: its ranks must pass the same items. The cache is allocated once (no concatenation
    copy), since it is the probe's largest memory cost; with ``cache_file`` it is a memory-mapped
    .npy file there (overwritten), so the page cache, not the process, holds it."""
    from aim_megatron.distributed import cpu_shims
    from aim_megatron.data.pil import _single_thread
    trunk.eval()
    m = images.cfg.model
    shape = (m.hidden_size,) if mean_tokens else (m.num_patches, m.hidden_size)
    if cache_file is None:
        feats = torch.empty((hi - lo, *shape), dtype=dtype)
    else:  # numpy has no bfloat16: store its bits as uint16 and view them
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        stored = np.lib.format.open_memmap(cache_file, mode="w+", shape=(hi - lo, *shape),
                                           dtype=np.uint16 if dtype == torch.bfloat16 else np.float32)
        feats = torch.from_numpy(stored).view(dtype)
    labels = torch.empty(hi - lo, dtype=torch.int64)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(images, range(lo, hi)), batch_size=batch_size, collate_fn=_collate_good,
        num_workers=num_workers, worker_init_fn=_single_thread if num_workers else None)
    n, corrupt = 0, []
    from tqdm import tqdm
    bar = tqdm(total=hi - lo, desc=f"features ({images.spec})", unit="img", dynamic_ncols=True,
               file=sys.stderr, disable=None if _is_rank0() else True)
    for x, y, bad in loader:
        bar.update(len(y) + len(bad))
        corrupt += bad
        if x is None:
            continue
        f = trunk.block_features(x.to(cpu_shims.device()), layers)
        feats[n:n + len(y)] = (f.mean(dim=1) if mean_tokens else f).to("cpu", dtype)
        labels[n:n + len(y)] = y
        n += len(y)
    bar.close()
    if cache_file is not None:
        stored.flush()
    return feats[:n], labels[:n], corrupt


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
    heads = record.get("probe_config", {}).get("num_heads") or m["num_heads"]
    probe = build_probe(record["kind"], m["hidden_size"], heads, record["num_classes"])
    if record["kind"] == "attentive" and "linear.bias" in record["state_dict"]:
        raise ValueError(f"{path} is an attentive probe with a classifier bias, saved before the "
                         "probe matched the official one (no bias); train it again with aim-probe")
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
    from aim_megatron.checkpoint import checkpointer as checkpoint
    path = Path(path)
    if (path / checkpoint.META_FILE).exists():
        return path
    for root in (path, path / "checkpoints"):
        if (root / checkpoint.LATEST_FILE).exists():
            return checkpoint.resolve(root, "latest")
    raise checkpoint.CheckpointError(
        f"{path} is not a checkpoint: pass RUN/checkpoints/step_*, RUN/checkpoints or RUN")


def data_specs(data: str, train_data: Optional[str] = None, test_data: Optional[str] = None) -> dict[str, str]:
    """The source of each split: explicit --train-data/--test-data, or from --data."""
    if (train_data is None) != (test_data is None):
        raise FileNotFoundError("give both --train-data and --test-data (or neither, and --data)")
    if train_data is not None:
        return {"train": train_data, "test": test_data}
    if data == "fashion-mnist" or data.endswith(".npz"):
        return {"train": data, "test": data}
    return {split: split_spec(data, split) for split in ("train", "test")}


def run_probe(cfg, ckpt: Path, probe_cfg: ProbeConfig, specs: dict[str, str], out_dir: Optional[Path],
              train_samples: Optional[int] = None, test_samples: Optional[int] = None,
              random_init: bool = False) -> dict:
    """Build the trunk (loaded from ``ckpt`` unless ``random_init``), cache features, train and
    evaluate the probe; rank 0 writes metrics.json, confusion.png and probe.pt to ``out_dir``.
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
        _all_reduce(counts, group)
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
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        title = (f"{probe_cfg.kind} probe{' (random-init trunk)' if random_init else ''}: "
                 f"top-1 {result['top1']:.1%}")
        save_confusion_png(result["confusion_matrix"], class_names, out_dir / "confusion.png", title)
        summary = {k: metrics[k] for k in ("top1", "top5", "num_train", "num_test")}
        save_probe(out_dir / "probe.pt", probe, probe_cfg, layers, m, class_names, summary)
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

if __name__ == "__main__":
    sys.exit(main())
