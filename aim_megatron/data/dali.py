"""NVIDIA DALI image pipeline: WebDataset shards or image folders -> augmented, normalized batches.

Per sample: read -> completeness check (JPEG/PNG end markers; failing samples are swapped for a
placeholder in the pipeline and dropped afterwards) -> decode + RandomResizedCrop (fused, bicubic)
-> optional ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8 (random order) -> horizontal flip -> normalize to CHW float.
On a GPU the decoder is "mixed" (nvJPEG) and the rest runs on the GPU; without CUDA everything runs on
the CPU with ``device_id=None``. :func:`select_dali_placement` is the one place that decides.

Sharding and resume, per source and DP rank: DP rank r reads samples [n*r // R, n*(r+1) // R)
(``shard_bounds``). For shards the reader is given only the tars holding them, the two end tars with
an index cut to this rank's samples (so no rank opens another rank's shard or index), as one DALI
shard; image folders keep ``shard_id=dp_rank, num_shards=dp_size``. Either way the reader runs with
``stick_to_shard=True, pad_last_batch=True``: each epoch spans whole batches whose first ``shard_size``
samples are this rank's, each once, and the rest copies of its last sample; those copies are dropped
here, so every epoch is disjoint across ranks and complete. Positions are DALI checkpoints (``enable_checkpointing=True``), which include the
reader, shuffle buffer and augmentation RNG states.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import itertools
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch import feed_ndarray

from aim_megatron.config import Config
from aim_megatron.data.base import (Chunk, ImageLoader, SourceStream, derive_seed, eval_resize_size,
                               shard_bounds)
from aim_megatron.data.shards import (IMAGE_EXTENSIONS, index_num_samples, parse_label, write_wds_index,
                                      write_wds_index_subset)
from aim_megatron.data.sources import Source, check_shard, count_error, rank_shards, require_tars

logger = logging.getLogger(__name__)

READER_NAME = "reader"


@dataclass(frozen=True)
class DaliPlacement:
    device_id: Optional[int]   # None: a CPU-only pipeline (no CUDA needed)
    decoder: str               # "mixed" (GPU decode) or "cpu"
    ops: str                   # "gpu" or "cpu"

    def describe(self) -> str:
        if self.device_id is None:
            return "CPU pipeline, device_id=None"
        return f"GPU pipeline on cuda:{self.device_id}, mixed decoder"


def select_dali_placement(requested: str = "auto", cuda_available: Optional[bool] = None,
                          device_index: Optional[int] = None) -> DaliPlacement:
    """Where the pipeline runs. "auto": the GPU when torch sees CUDA, else the CPU."""
    if requested not in ("auto", "cpu", "gpu"):
        raise ValueError(f"data.dali_device={requested!r}: use auto, cpu or gpu")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if requested == "gpu" and not cuda_available:
        raise RuntimeError("data.dali_device=gpu but CUDA is not available; use data.dali_device=auto or cpu")
    if requested == "cpu" or not cuda_available:
        return DaliPlacement(device_id=None, decoder="cpu", ops="cpu")
    index = torch.cuda.current_device() if device_index is None else device_index
    return DaliPlacement(device_id=index, decoder="mixed", ops="gpu")


def _placeholder_jpeg() -> np.ndarray:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buf, "JPEG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()


_PLACEHOLDER = _placeholder_jpeg()
# The bytes that make a file complete, as (pattern, mask) over its first 4 and last 8 bytes:
# JPEG starts FF D8 FF and ends FF D9; PNG starts with its signature and ends with the IEND chunk
# (IEND + 4 bytes of CRC).
_JPEG_ENDS = ([0xFF, 0xD8, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xD9], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1])
_PNG_ENDS = ([0x89, 0x50, 0x4E, 0x47, 0x49, 0x45, 0x4E, 0x44, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0])


def _is_complete_image(raw):
    """Whether each encoded sample is a complete JPEG or PNG, from 12 bytes: slices padded with
    zeros (safe for short or empty samples), compared under a mask."""
    n = fn.cast(raw.shape(), dtype=types.INT32)
    pad = dict(axes=[0], out_of_bounds_policy="pad", fill_values=0)
    ends = fn.cat(fn.slice(raw, start=[0], shape=[4], **pad), fn.slice(raw, start=n - 8, shape=[8], **pad))

    def matches(pattern, mask):
        pattern = types.Constant(np.array(pattern, dtype=np.uint8))
        mask = types.Constant(np.array(mask, dtype=np.uint8) * 0xFF)
        return fn.reductions.max((ends ^ pattern) & mask) == 0

    return matches(*_JPEG_ENDS) | matches(*_PNG_ENDS)


@pipeline_def(enable_conditionals=True)
def _image_pipeline(source: Source, placement: DaliPlacement, cfg: Config, shard_id: int, num_shards: int,
                    train: bool = True):
    d, m = cfg.data, cfg.model
    reader_args = dict(name=READER_NAME, shard_id=shard_id, num_shards=num_shards, stick_to_shard=True,
                       pad_last_batch=True, random_shuffle=d.shuffle and train, initial_fill=d.shuffle_buffer)
    if source.kind == "wds":
        exts = [";".join(IMAGE_EXTENSIONS)] + (["cls"] if source.has_labels else [])
        index_paths = source.indices if all(source.indices) else None
        outs = fn.readers.webdataset(paths=source.tars, index_paths=index_paths, ext=exts,
                                     missing_component_behavior="empty", case_sensitive_extensions=False,
                                     **reader_args)
        if source.has_labels:
            raw, label = outs
        else:  # one output comes back as a node, not a list
            raw = outs
            label = raw.shape()  # placeholder output, ignored
    else:
        # Plain reads: mmap fails on empty files, which must count as corrupt instead.
        raw, label = fn.readers.file(files=source.files, labels=source.labels, dont_use_mmap=True,
                                     **reader_args)
    info = fn.get_property(raw, key="source_info")

    valid = _is_complete_image(raw)
    if valid:
        encoded = raw
    else:
        encoded = types.Constant(_PLACEHOLDER)

    gray = m.in_channels == 1
    output_type = types.GRAY if gray else types.RGB
    mean, std = d.normalization(m.in_channels)
    norm = dict(dtype=types.FLOAT, output_layout="CHW", mean=[255.0 * x for x in mean], std=[255.0 * x for x in std])
    if not train:  # evaluation (official): shorter side to image_size / 0.875 (bicubic), center crop
        # Sizes and offsets in torchvision's integer arithmetic, so both loaders crop the same pixels:
        # long side int(R * long / short), offset int(round((size - S) / 2)) (round half to even).
        images = fn.decoders.image(encoded, device=placement.decoder, output_type=output_type)
        r, crop = eval_resize_size(m.image_size), m.image_size
        shape = fn.cast(fn.peek_image_shape(encoded), dtype=types.INT64)
        h, w = shape[0], shape[1]
        short = dmath.min(h, w)
        new_h, new_w = (r * h) // short, (r * w) // short
        images = fn.resize(images, size=fn.cast(fn.stack(new_h, new_w), dtype=types.FLOAT),
                           interp_type=types.INTERP_CUBIC, antialias=True)
        half = lambda n: n // 2 + (n % 2) * ((n // 2) % 2)
        anchor = fn.cast(fn.stack(half(new_h - crop), half(new_w - crop)), dtype=types.FLOAT)
        images = fn.slice(images, anchor, types.Constant([crop, crop], dtype=types.FLOAT), axes=[0, 1],
                          normalized_anchor=False, normalized_shape=False)
        images = fn.crop_mirror_normalize(images, **norm)
        return images, label, valid, info
    images = fn.decoders.image_random_crop(
        encoded, device=placement.decoder, output_type=output_type,
        random_area=[d.crop_scale_min, d.crop_scale_max], random_aspect_ratio=[3 / 4, 4 / 3],
        num_attempts=10)
    images = fn.resize(images, size=[m.image_size, m.image_size], interp_type=types.INTERP_CUBIC,
                       antialias=True)
    if d.color_jitter:
        images = _color_jitter(images, gray)
    mirror = fn.random.coin_flip(probability=0.5) if d.hflip else 0
    images = fn.crop_mirror_normalize(images, mirror=mirror, **norm)
    return images, label, valid, info


def _color_jitter(images, gray: bool):
    """torchvision ColorJitter(0.4, 0.4, 0.2, 0.1) under RandomApply(p=0.8), as the official recipe: the
    adjustments (brightness, contrast, saturation, hue; only the first two on greyscale) run in a
    random order per sample. The order is drawn as a permutation index and looked up per slot;
    every slot runs each adjustment with an identity factor unless it is that slot's one, since
    each adjustment clips and so the order changes the result."""
    on = fn.cast(fn.random.coin_flip(probability=0.8), dtype=types.FLOAT)
    factor = lambda lo, hi: 1.0 + on * (fn.random.uniform(range=[lo, hi]) - 1.0)
    brightness, contrast = factor(0.6, 1.4), factor(0.6, 1.4)
    n_ops = 2 if gray else 4
    if not gray:
        saturation = factor(0.8, 1.2)
        hue = on * fn.random.uniform(range=[-36.0, 36.0])  # 0.1 of the hue circle, in degrees
    orders = list(itertools.permutations(range(n_ops)))
    order = fn.random.uniform(values=list(range(len(orders))), dtype=types.INT32)
    for slot in range(n_ops):
        op = fn.lookup_table(order, keys=list(range(len(orders))), values=[o[slot] for o in orders],
                             dtype=types.INT32)
        pick = [fn.cast(op == i, dtype=types.FLOAT) for i in range(n_ops)]
        images = fn.brightness(images, brightness=1.0 + pick[0] * (brightness - 1.0))
        # torchvision blends with the mean of the greyscale image (DALI's contrast centres on 128 and
        # takes no GPU-side centre), so contrast is written out: grey + c * (x - grey), clipped.
        x = fn.cast(images, dtype=types.FLOAT)
        means = fn.reductions.mean(x, axes=[0, 1])
        grey = means[0] if gray else 0.299 * means[0] + 0.587 * means[1] + 0.114 * means[2]
        c = 1.0 + pick[1] * (contrast - 1.0)
        if images.device == "gpu":
            c = c.gpu()
        images = fn.cast(dmath.clamp(grey + c * (x - grey), 0.0, 255.0), dtype=types.UINT8)
        if not gray:
            images = fn.saturation(images, saturation=1.0 + pick[2] * (saturation - 1.0))
            images = fn.hue(images, hue=pick[3] * hue)
    return images


class DaliStream(SourceStream):
    """One source on one DP rank through a DALI pipeline whose batch is the micro-batch size."""

    def __init__(self, cfg: Config, source: Source, source_id: int, dp_rank: int, dp_size: int,
                 batch_size: int, placement: DaliPlacement, train: bool = True):
        super().__init__(source.spec)
        self.cfg, self.source, self.batch_size, self.placement = cfg, source, batch_size, placement
        self.train = train
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._base_seed = self._seed = derive_seed(cfg.train.seed, source_id, dp_rank)
        lo, hi = shard_bounds(source.num_samples, dp_rank, dp_size)
        self.shard_size = hi - lo
        self._index_dir: Optional[tempfile.TemporaryDirectory] = None
        if source.kind == "wds":   # the reader gets only this rank's samples: one shard of one
            self.source, self._shard_id, self._num_shards = self._rank_view(source, lo, hi), 0, 1
        else:
            self._shard_id, self._num_shards = dp_rank, dp_size
        self._pipe = None
        self._build(checkpoint=None, batches_run=0)

    def _rank_view(self, source: Source, lo: int, hi: int) -> Source:
        """The source cut to samples [lo, hi): this rank's tars only, the two at the ends with an index
        listing only this rank's samples (written to a node-local temporary directory), so DALI opens
        no other shard or index. Each index is checked against the description when opened."""
        starts = source.shard_starts()
        shards = [t for t in rank_shards(source, lo, hi) if source.shard_sizes[t] > 0]
        require_tars(source, shards)
        indices = []
        for t in shards:
            first, stop = max(lo - starts[t], 0), min(hi, starts[t + 1]) - starts[t]
            idx = check_shard(source, t)
            if idx is not None and first == 0 and stop == source.shard_sizes[t]:
                indices.append(idx)
                continue
            if self._index_dir is None:
                self._index_dir = tempfile.TemporaryDirectory(prefix="aim-dali-index-")
            if idx is None:   # no index on disk: DALI would scan the tar, so do it once here
                logger.warning("%s has no DALI index; scanning it (slow for big shards). Create it with "
                               "tools/make_shards.py --index-only %s", source.tars[t], source.tars[t])
                idx = str(write_wds_index(source.tars[t], Path(self._index_dir.name) / f"{t}.full.idx"))
                if index_num_samples(idx) != source.shard_sizes[t]:
                    raise count_error(source, t, index_num_samples(idx), "scanning the tar")
            cut = str(Path(self._index_dir.name) / f"{t}.idx")
            write_wds_index_subset(idx, cut, int(first), int(stop))
            indices.append(cut)
        return dataclasses.replace(source, tars=[source.tars[t] for t in shards], indices=indices,
                                   shard_sizes=[source.shard_sizes[t] for t in shards], num_samples=hi - lo)

    def _build(self, checkpoint: Optional[bytes], batches_run: int) -> None:
        self.close()
        self._pipe = _image_pipeline(
            self.source, self.placement, self.cfg, self._shard_id, self._num_shards, self.train,
            batch_size=self.batch_size, num_threads=max(1, self.cfg.data.num_workers),
            device_id=self.placement.device_id, seed=self._seed, enable_checkpointing=True,
            checkpoint=checkpoint, prefetch_queue_depth=2)
        self._pipe.build()
        meta = self._pipe.reader_meta(READER_NAME)
        if meta["epoch_size"] != self.source.num_samples:
            raise RuntimeError(f"DALI counts {meta['epoch_size']} samples in {self.source.spec!r}, the index "
                               f"files say {self.source.num_samples}; regenerate the .idx files")
        # Samples DALI emits per epoch of this shard: the per-shard padded size rounded up to batches.
        per_shard = meta["epoch_size_padded"] // self._num_shards
        self._window = math.ceil(per_shard / self.batch_size) * self.batch_size
        self._batches_run = batches_run

    @property
    def epoch(self) -> int:
        return self._batches_run * self.batch_size // self._window

    def _max_empty_chunks(self) -> int:
        return self._window // self.batch_size + 1

    def _position(self) -> dict:
        return {"checkpoint": base64.b64encode(self._pipe.checkpoint()).decode("ascii"),
                "batches_run": self._batches_run, "seed": self._seed}

    def _seek(self, position: dict) -> None:
        self._seed = int(position["seed"])
        self._build(base64.b64decode(position["checkpoint"]), int(position["batches_run"]))

    def _restart(self) -> None:
        self._build(checkpoint=None, batches_run=0)

    def _read_chunk(self) -> Chunk:
        images_tl, labels_tl, valid_tl, info_tl = self._pipe.run()
        first = self._batches_run * self.batch_size
        self._batches_run += 1
        in_window = (first + np.arange(self.batch_size)) % self._window
        real = in_window < self.shard_size                     # drop pad_last_batch copies
        valid = np.array(valid_tl.as_array(), dtype=bool).reshape(-1)
        bad = np.flatnonzero(real & ~valid)
        if len(bad):
            self.report_corrupt([bytes(np.asarray(info_tl[int(i)])).decode(errors="replace") for i in bad])
        keep = np.flatnonzero(real & valid)
        labels = self._labels_of(labels_tl)[torch.from_numpy(keep)]
        dense = images_tl.as_tensor()
        if self.placement.ops == "cpu":
            # Zero-copy view of DALI's output buffer; take() copies it out before the next run().
            images, owned = torch.from_dlpack(dense), False
        else:
            images = torch.empty(list(dense.shape()), dtype=torch.float32, device=f"cuda:{self.placement.device_id}")
            feed_ndarray(dense, images, cuda_stream=torch.cuda.current_stream())  # on torch's stream
            owned = True
        rows = None if len(keep) == self.batch_size else keep
        return Chunk(images, labels, rows, owned)

    def _labels_of(self, labels_tl) -> torch.Tensor:
        if self.source.kind == "folder":
            return torch.from_numpy(np.array(labels_tl.as_array(), dtype=np.int64).reshape(-1))
        if not self.source.has_labels:
            return torch.full((self.batch_size,), -1, dtype=torch.int64)
        return torch.tensor([parse_label(bytes(np.asarray(labels_tl[i]))) for i in range(len(labels_tl))],
                            dtype=torch.int64)

    def close(self) -> None:
        if self._pipe is not None:
            del self._pipe
            self._pipe = None


class DaliImageLoader(ImageLoader):
    """The training loader on NVIDIA DALI (see module docstring)."""
    kind = "dali"

    def __init__(self, cfg: Config, dp_rank: int, dp_size: int, micro_batch_size: int, split: str = "train",
                 placement: Optional[DaliPlacement] = None, sources: Optional[list[Source]] = None):
        self.placement = placement or select_dali_placement(cfg.data.dali_device)
        super().__init__(cfg, dp_rank, dp_size, micro_batch_size, split, sources)

    def _make_stream(self, source: Source, source_id: int) -> SourceStream:
        return DaliStream(self.cfg, source, source_id, self.dp_rank, self.dp_size, self.micro_batch_size,
                          self.placement, self.train)
