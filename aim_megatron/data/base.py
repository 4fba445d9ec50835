"""Image data path: sources, per-sample prefix lengths, weighted mixing and resumable loaders.

    loader = build_loader(cfg, dp_rank, dp_size, micro_batch_size)   # only data-parallel readers call it
    batch = next(loader)      # {"images": f32 [b, C, H, W] normalized, "prefix_len": i64 [b], "labels": i64 [b]}
    state = loader.state_dict()          # plain ints/strings/lists: store it in the training checkpoint
    loader2 = build_loader(cfg, dp_rank, dp_size, micro_batch_size); loader2.load_state_dict(state)
    loader2.seek(microbatch)             # instead, when no state fits (e.g. another DP size)
    val = build_loader(cfg, dp_rank, dp_size, micro_batch_size, split="val")   # data.val_sources, center crop

Micro-batch ``j`` of data-parallel rank ``r`` holds the global sample positions that
``parallel.split_microbatches`` gives rank ``r`` (:func:`sample_positions`), so any rank (a TP or PP
peer that reads no images, or a resumed run) gets the same ``prefix_len`` from
:func:`prefix_lengths` / :func:`microbatch_prefix_lengths` without touching the data.

Each source is a stream of decoded, augmented samples. Stream ``s`` of DP rank ``r`` reads the
contiguous shard ``[n*r // R, n*(r+1) // R)`` of its ``n`` samples (the split DALI uses) and returns
each of them exactly once per epoch, in a reshuffled order; epochs follow each other without a break.
With several sources, every sample position is assigned to a source by a seeded hash weighted by
``data.train_weights``, so the mixture is exact over time and the same after a resume.
Corrupt samples (truncated, not an image, empty) are skipped, counted (``loader.num_corrupt``) and logged.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from aim_megatron.config import Config, ModelConfig
from aim_megatron.data.sources import DataSourceError, Source, resolve_source

logger = logging.getLogger(__name__)

STATE_VERSION = 1
DALI_INSTALL_HINT = "pip install nvidia-dali-cuda130==2.4.0"
# Evaluation crop of the official AIM probe: Resize(256) + CenterCrop(224), i.e. the shorter side to
# image_size / 0.875, then the centred image_size square.
EVAL_CROP_RATIO = 0.875
_LOG_CORRUPT_NAMES = 100    # distinct corrupt samples logged per stream (all are counted)


# --------------------------------------------------------------------------- deterministic hashing

_U64 = np.uint64
_MASK64 = (1 << 64) - 1
# Salts keep the per-purpose random streams independent.
SALT_PREFIX, SALT_MIX, SALT_SEED = 0x5EED_0001, 0x5EED_0002, 0x5EED_0003


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: a bijective avalanche on uint64 (wraps modulo 2**64)."""
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def hash_uniform(seed: int, salt: int, positions: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1), a pure function of (seed, salt, position)."""
    key = _U64(((seed * 0x9E3779B97F4A7C15) ^ (salt * 0xD1B54A32D192ED03)) & _MASK64)
    x = _mix64(_mix64(np.asarray(positions, dtype=np.int64).astype(_U64) ^ key) + key)
    return (x >> _U64(11)).astype(np.float64) * 2.0 ** -53


def derive_seed(*parts: int) -> int:
    """A 31-bit seed (what DALI and torch accept) from integers, e.g. (train seed, source, rank)."""
    x = np.array([0], dtype=np.int64)
    for p in parts:
        x = (hash_uniform(int(p), SALT_SEED, x) * 2 ** 62).astype(np.int64)
    return int(x[0] % (2 ** 31 - 1))


# --------------------------------------------------------------------------- positions and prefixes

def sample_positions(microbatch_index: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                     global_batch_size: int) -> np.ndarray:
    """Global sample positions of one DP rank's micro-batch, laid out as split_microbatches does:
    global batch ``step`` holds positions ``step*G .. step*G+G-1``; rank r owns the r-th 1/dp of it,
    cut into consecutive micro-batches."""
    per_rank, rest = divmod(global_batch_size, dp_size)
    if rest or per_rank % micro_batch_size:
        raise ValueError(f"global batch {global_batch_size} is not a multiple of micro_batch_size*dp = "
                         f"{micro_batch_size}*{dp_size}; fix train.global_batch_size")
    step, i = divmod(microbatch_index, per_rank // micro_batch_size)
    start = step * global_batch_size + dp_rank * per_rank + i * micro_batch_size
    return np.arange(start, start + micro_batch_size, dtype=np.int64)


def prefix_lengths(seed: int, sample_indices: np.ndarray | torch.Tensor | list[int],
                   model_cfg: ModelConfig) -> torch.Tensor:
    """int64 prefix length per global sample position, uniform on ``model_cfg.prefix_range``."""
    lo, hi = model_cfg.prefix_range
    idx = sample_indices.cpu().numpy() if isinstance(sample_indices, torch.Tensor) else sample_indices
    u = hash_uniform(seed, SALT_PREFIX, np.asarray(idx, dtype=np.int64))
    return torch.from_numpy(lo + np.floor(u * (hi - lo + 1)).astype(np.int64))


def microbatch_prefix_lengths(cfg: Config, dp_rank: int, dp_size: int, micro_batch_size: int,
                              microbatch_index: int) -> torch.Tensor:
    """prefix_len of a micro-batch, for ranks that do not read images (TP/PP peers)."""
    pos = sample_positions(microbatch_index, dp_rank, dp_size, micro_batch_size,
                           cfg.train.global_batch_size)
    return prefix_lengths(cfg.train.seed, pos, cfg.model)


def assign_sources(seed: int, positions: np.ndarray, weights: list[float]) -> np.ndarray:
    """Source index per sample position, drawn with probabilities proportional to ``weights``."""
    if len(weights) == 1:
        return np.zeros(len(positions), dtype=np.int64)
    cdf = np.cumsum(np.asarray(weights, dtype=np.float64))
    u = hash_uniform(seed, SALT_MIX, positions) * cdf[-1]
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(weights) - 1)


def shard_bounds(num_samples: int, rank: int, num_shards: int) -> tuple[int, int]:
    """Contiguous shard of a data-parallel rank; the same split DALI's readers use."""
    return num_samples * rank // num_shards, num_samples * (rank + 1) // num_shards


# --------------------------------------------------------------------------- streams

def _copy_rows(dst: torch.Tensor, src: torch.Tensor, rows: np.ndarray) -> None:
    """dst[:] = src[rows] for sorted rows, one slice copy per run of consecutive rows
    (runs are long: only padding and rare corrupt samples are left out; index_select is slow here)."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    start = 0
    for run in np.split(rows, breaks):
        dst[start:start + len(run)].copy_(src[int(run[0]):int(run[-1]) + 1])
        start += len(run)


@dataclass
class Chunk:
    """Samples decoded by one read. ``images`` may be a view of a reader's reusable buffer
    (``owned=False``), copied out before the next read; ``rows`` picks the usable ones (None: all)."""
    images: torch.Tensor
    labels: torch.Tensor                     # labels of the usable samples
    rows: Optional[np.ndarray] = None     # sorted
    owned: bool = True

    def __len__(self) -> int:
        return len(self.labels)


class SourceStream:
    """An endless stream of (image, label) samples of one source on one DP rank, read in chunks.

    Subclasses implement ``_read_chunk`` (next decoded chunk, corrupt samples left out),
    ``_position`` (an opaque, JSON-friendly position before the next chunk) and ``_seek``.
    Resume state = position before the current chunk + how many of its samples were consumed:
    re-reading that chunk reproduces it exactly because augmentation randomness is part of the position.
    """

    def __init__(self, spec: str):
        self.spec = spec
        self.num_corrupt = 0
        self._chunk: Optional[Chunk] = None
        self._offset = 0
        self._chunk_start: tuple[Any, int] = (None, 0)
        self._empty_chunks = 0
        self._logged: set[str] = set()

    # -- implemented by subclasses
    def _read_chunk(self) -> Chunk:
        raise NotImplementedError

    def _position(self) -> Any:
        raise NotImplementedError

    def _seek(self, position: Any) -> None:
        raise NotImplementedError

    def _restart(self) -> None:
        """Go back to the start of the shard (with the current ``_seed``)."""
        raise NotImplementedError

    def restart(self, salt: int) -> None:
        """Start over from the shard's beginning with a seed derived from ``salt`` (a fresh order)."""
        self._seed = derive_seed(self._base_seed, salt)
        self._chunk, self._offset = None, 0
        self._restart()

    def _max_empty_chunks(self) -> int:
        """Consecutive all-corrupt chunks after which the source counts as unusable (> one epoch)."""
        return 1 << 30

    @property
    def epoch(self) -> int:
        return 0

    def close(self) -> None:
        pass

    # -- shared logic
    def report_corrupt(self, names: list[str]) -> None:
        """Count skipped samples (every occurrence, so each epoch counts again); log each name once."""
        for name in names:
            self.num_corrupt += 1
            if name not in self._logged and len(self._logged) < _LOG_CORRUPT_NAMES:
                self._logged.add(name)
                logger.warning("skipped corrupt sample %s in source %s (%d skipped so far)",
                               name, self.spec, self.num_corrupt)

    def _ensure_chunk(self) -> Chunk:
        """The current chunk, reading the next one when it is used up."""
        while self._chunk is None or self._offset == len(self._chunk):
            self._chunk_start = (self._position(), self.num_corrupt)
            self._chunk = self._read_chunk()
            self._offset = 0
            if len(self._chunk):
                self._empty_chunks = 0
                break
            self._empty_chunks += 1
            if self._empty_chunks > self._max_empty_chunks():
                raise RuntimeError(f"data source {self.spec!r}: every sample of an epoch on this rank is "
                                   f"corrupt ({self.num_corrupt} skipped); check it with tools/make_shards.py")
        return self._chunk

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``n`` samples: images [n, C, H, W] and labels [n], copied once at most."""
        chunk = self._ensure_chunk()
        if self._offset == 0 and n == len(chunk) and chunk.owned and chunk.rows is None:
            self._offset = n                     # hand over a whole owned chunk without a copy
            return chunk.images, chunk.labels
        images = chunk.images.new_empty((n, *chunk.images.shape[1:]))
        labels, filled = [], 0
        while filled < n:
            chunk = self._ensure_chunk()         # a new read happens only after the last copy-out
            k = min(n - filled, len(chunk) - self._offset)
            dst = images[filled:filled + k]
            if chunk.rows is None:
                dst.copy_(chunk.images[self._offset:self._offset + k])
            else:
                _copy_rows(dst, chunk.images, chunk.rows[self._offset:self._offset + k])
            labels.append(chunk.labels[self._offset:self._offset + k])
            self._offset += k
            filled += k
        return images, labels[0] if len(labels) == 1 else torch.cat(labels)

    def state_dict(self) -> dict:
        if self._chunk is None or self._offset == len(self._chunk):
            return {"position": self._position(), "offset": 0, "num_corrupt": self.num_corrupt}
        position, corrupt = self._chunk_start
        return {"position": position, "offset": self._offset, "num_corrupt": corrupt}

    def load_state_dict(self, state: dict) -> None:
        self._seek(state["position"])
        self.num_corrupt = int(state["num_corrupt"])
        self._chunk = None
        self._offset = 0
        if state["offset"]:
            self._ensure_chunk()
            self._offset = int(state["offset"])


def normalize_(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """In place: images in [0, 1] -> (x - mean) / std per channel; [b, C, H, W]."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images.sub_(m).div_(s)


class SyntheticStream(SourceStream):
    """Seeded random smooth images (low-resolution noise, bilinearly upsampled); labels -1.

    Each image is a function of (seed, source, split, global sample position) alone, so every
    parallel layout of the same global batch, a resumed run, and a run resharded to another
    data-parallel size see the same images. There is no stream position to save."""

    def __init__(self, cfg: Config, source_id: int, dp_rank: int, chunk_size: int, train: bool = True):
        super().__init__("synthetic")
        self.cfg, self.chunk_size = cfg, chunk_size
        self._base_seed = self._seed = derive_seed(cfg.train.seed, source_id, int(not train))

    def _position(self) -> int:
        return 0

    def _seek(self, position: int) -> None:
        pass

    def _restart(self) -> None:
        pass

    def restart(self, salt: int) -> None:
        pass  # images follow sample positions, which seek() keeps exact

    def at_positions(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.cfg.model
        low = max(2, m.image_size // 4)
        images = torch.stack([
            torch.rand(m.in_channels, low, low,
                       generator=torch.Generator().manual_seed(derive_seed(self._seed, int(p))))
            for p in positions])
        images = F.interpolate(images, size=(m.image_size, m.image_size), mode="bilinear",
                               align_corners=False).clamp_(0, 1)
        normalize_(images, *self.cfg.data.normalization(m.in_channels))
        return images, torch.full((len(positions),), -1, dtype=torch.int64)


# --------------------------------------------------------------------------- loaders

class ImageLoader:
    """Endless iterator of micro-batches for one data-parallel rank; resumable mid-epoch.

    Subclasses provide ``_make_stream`` for real sources ("dali", "torch")."""

    kind = "base"

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int, micro_batch_size: int, split: str = "train",
                 sources: Optional[list[Source]] = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}: use 'train' or 'val'")
        d = cfg.data
        specs = d.train_sources if split == "train" else d.val_sources
        if not specs:
            raise ValueError(f"data.{split}_sources is empty; name shards, an image folder or 'synthetic'")
        weights = d.train_weights if split == "train" else None
        if weights is not None and len(weights) != len(specs):
            raise ValueError(f"data.train_weights has {len(weights)} values for "
                             f"{len(specs)} data.train_sources; give one weight per source")
        if weights is not None and not all(w > 0 for w in weights):
            raise ValueError(f"data.train_weights={weights}: weights must be positive")
        # Fail now, not at step N, when positions cannot be laid out.
        sample_positions(0, dp_rank, dp_size, micro_batch_size, cfg.train.global_batch_size)
        self.cfg, self.dp_rank, self.dp_size, self.micro_batch_size = cfg, dp_rank, dp_size, micro_batch_size
        self.split, self.train = split, split == "train"
        self.weights = list(weights) if weights is not None else [1.0] * len(specs)
        # Given, or as resolve_sources shared them at start-up, or (single process) read here.
        self.sources = sources if sources is not None else \
            [resolve_source(spec, f"data.{split}_sources") for spec in specs]
        if [s.spec for s in self.sources] != list(specs):
            raise ValueError(f"sources {[s.spec for s in self.sources]} are not data.{split}_sources={specs}")
        for src in self.sources:
            if src.kind != "synthetic" and src.num_samples < dp_size:
                raise DataSourceError(f"data.{split}_sources: data source {src.spec!r} has {src.num_samples} "
                                      f"samples, fewer than the {dp_size} data-parallel ranks; add data "
                                      f"or lower the DP size")
        self.streams: list[SourceStream] = []
        try:
            for i, src in enumerate(self.sources):
                self.streams.append(SyntheticStream(cfg, i, dp_rank, micro_batch_size, self.train)
                                    if src.kind == "synthetic" else self._make_stream(src, i))
        except BaseException:
            self.close()
            raise
        self.microbatch = 0

    def _make_stream(self, source: Source, source_id: int) -> SourceStream:
        raise ValueError(f"{type(self).__name__} reads only 'synthetic'; use build_loader for {source.spec!r}")

    @property
    def num_corrupt(self) -> int:
        return sum(s.num_corrupt for s in self.streams)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        positions = sample_positions(self.microbatch, self.dp_rank, self.dp_size, self.micro_batch_size,
                                     self.cfg.train.global_batch_size)
        which = assign_sources(self.cfg.train.seed, positions, self.weights)
        if len(self.streams) == 1:
            images, labels = self._take(self.streams[0], positions)
        else:
            images = labels = None
            for sid, stream in enumerate(self.streams):
                rows = torch.from_numpy(np.flatnonzero(which == sid))
                if len(rows) == 0:
                    continue
                part_images, part_labels = self._take(stream, positions[rows.numpy()])
                if images is None:
                    images = part_images.new_empty((self.micro_batch_size, *part_images.shape[1:]))
                    labels = torch.empty(self.micro_batch_size, dtype=torch.int64)
                images.index_copy_(0, rows.to(images.device), part_images)
                labels[rows] = part_labels
        self.microbatch += 1
        return {"images": images, "prefix_len": prefix_lengths(self.cfg.train.seed, positions, self.cfg.model),
                "labels": labels}

    @staticmethod
    def _take(stream: SourceStream, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(stream, SyntheticStream):
            return stream.at_positions(positions)
        return stream.take(len(positions))

    def _identity(self) -> dict:
        return {"kind": self.kind, "split": self.split, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "micro_batch_size": self.micro_batch_size, "seed": self.cfg.train.seed,
                "global_batch_size": self.cfg.train.global_batch_size,
                "sources": [s.spec for s in self.sources], "weights": self.weights}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, **self._identity(), "microbatch": self.microbatch,
                "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')} is not {STATE_VERSION}")
        mine = self._identity()
        diffs = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diffs:
            raise ValueError("cannot resume the data loader exactly, the setup changed ("
                             + "; ".join(diffs) + "). Restore the saved settings (data.loader picks the "
                             "kind), or drop the data state to restart the data order")
        for stream, s in zip(self.streams, state["streams"]):
            stream.load_state_dict(s)
        self.microbatch = int(state["microbatch"])

    def seek(self, microbatch: int) -> None:
        """Continue at micro-batch ``microbatch`` without a saved data state (e.g. the DP layout changed):
        prefix lengths and source mixing follow the sample positions exactly; every stream restarts its
        shard with a seed derived from ``microbatch``, so the first epoch's order is not replayed."""
        self.microbatch = int(microbatch)
        for stream in self.streams:
            stream.restart(self.microbatch)

    @property
    def epochs(self) -> list[int]:
        """Current epoch of each source on this rank."""
        return [s.epoch for s in self.streams]

    def close(self) -> None:
        for s in self.streams:
            s.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class SyntheticLoader(ImageLoader):
    """Sources ``["synthetic"]``: seeded random images, labels -1."""
    kind = "synthetic"


# --------------------------------------------------------------------------- selection

def eval_resize_size(image_size: int) -> int:
    """Shorter side before the evaluation centre crop: ceil(S / 0.875) as ml-aim's val_transforms
    (256 for 224, 32 for 28)."""
    return math.ceil(image_size / EVAL_CROP_RATIO)
