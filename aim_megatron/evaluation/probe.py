"""The probe itself: its config (``probe:`` YAML section, ``probe.key=value`` overrides), the trunk
blocks it reads, the attentive and linear probe heads, and probe checkpoints (``probe.safetensors``;
older ``probe.pt`` files load too).

Features are the mean of raw trunk block outputs (``AIMModel.block_features``, bidirectional
attention) over a layer set: "last" (last 6 blocks), "best" (the paper's blocks for the official
presets) or explicit 0-based indices. Around it: ``labelled_data`` (images), ``features`` (frozen
trunk features), ``probe_train`` (training and evaluation), ``report`` (outputs) and ``probe_cli``
(the ``aim-probe`` command).
"""
from __future__ import annotations

import dataclasses
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from aim_megatron.checkpoint.pickled_files import refusal_reason
from aim_megatron.config import (BEST_PROBE_LAYERS, PRESETS, ConfigError, ModelConfig, _coerce, parse_value,
                                 read_yaml_file)

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

def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Sum ``t`` in place over ``group``; without a group (one process) it is already the sum."""
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
                all_reduce_sum(sums, self.group)
                count = sums[-1]
                mean = sums[:-1] / count
                var = all_reduce_sum(((flat - mean) ** 2).sum(0), self.group) / count
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


# --------------------------------------------------------------------------- probe checkpoints

# Probes are passed around between people, so their files hold data only: the tensors in
# safetensors, the record as JSON in its metadata. Nothing in such a file can run when loaded.
PROBE_RECORD_KEY = "aim_megatron_probe"


def save_probe(path: str | Path, probe: nn.Module, cfg: ProbeConfig, layers: list[int],
               model: ModelConfig, class_names: list[str], metrics: Optional[dict] = None) -> None:
    """A safetensors file (whatever ``path`` is named): the probe's state dict, and its record
    (everything ``load_probe`` returns but the state dict) as JSON under ``PROBE_RECORD_KEY``."""
    from safetensors.torch import save_file
    record = {"format": PROBE_FORMAT, "kind": cfg.kind, "layers": layers,
              "probe_config": dataclasses.asdict(cfg), "model": dataclasses.asdict(model),
              "num_classes": probe.linear.out_features, "class_names": class_names,
              "metrics": metrics or {}}
    tensors = {k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}
    save_file(tensors, str(path), metadata={PROBE_RECORD_KEY: json.dumps(record)})


def _is_safetensors_file(path: Path) -> bool:
    """A safetensors header by its shape (a length, then JSON that fits in the file). Not the
    other way round: a header length can start with torch.save's bytes ("PK", 0x80)."""
    with open(path, "rb") as f:
        head = f.read(9)
    header_end = 8 + int.from_bytes(head[:8], "little")
    return len(head) == 9 and head[8:] == b"{" and header_end <= path.stat().st_size


def _read_probe_record(path: Path) -> Any:
    if not _is_safetensors_file(path):  # a torch.save probe.pt of before, or not a probe
        # weights_only: tensors, dicts, lists, strings and numbers, which is all a probe record
        # holds; a pickled function or class (code it would run) is refused before it is built.
        try:
            with open(path, "rb") as f:  # a file object: torch.load would route a path by its suffix
                return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "GLOBAL" in str(exc):  # a class or function to build: code the file would run
                raise ValueError(f"{path} holds more than a probe's tensors and settings, refused: it "
                                 f"could run code on this machine ({refusal_reason(exc)})") from None
            raise ValueError(f"{path} is not an aim-megatron probe checkpoint (neither safetensors nor "
                             f"torch.save: {refusal_reason(exc)})") from None
        except (RuntimeError, EOFError, ValueError, KeyError, AttributeError, TypeError) as exc:  # damage
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"{path} is not an aim-megatron probe checkpoint: {reason}") from None
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(PROBE_RECORD_KEY)
            record = json.loads(raw) if raw is not None else None
            if isinstance(record, dict):
                record["state_dict"] = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{path} is not an aim-megatron probe checkpoint (neither safetensors nor "
                         f"torch.save: {reason})") from None
    return record


def load_probe(path: str | Path) -> tuple[nn.Module, dict]:
    """(probe in eval mode, the saved record) of a ``save_probe`` file, or of a ``probe.pt`` from
    before probes were safetensors. Neither runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probe checkpoint {path} does not exist")
    record = _read_probe_record(path)
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
