"""Fallback loader without DALI: PIL decode + augmentation in torch DataLoader workers.

Same interface, batch contract, sharding and resume semantics as the DALI loader (not the same
random crops). WebDataset tars are read with the stdlib: offsets from the DALI index (or a tar scan)
of only the tars this rank reads, then seek + read. Each rank's shard is permuted per epoch from (seed, source, rank, epoch), and every
sample's augmentation draws from its own generator seeded by (seed, source, rank, epoch, sample), so a
position is just (epoch, batch) and resuming needs no RNG state.
"""
from __future__ import annotations

import io
import math
import os
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageEnhance

from aim_megatron.config import Config
from aim_megatron.data.base import (Chunk, ImageLoader, SourceStream, derive_seed, eval_resize_size,
                               shard_bounds)
from aim_megatron.data.shards import IMAGE_EXTENSIONS, parse_label
from aim_megatron.data.sources import Source, open_shard, rank_shards

_RATIO = (3 / 4, 4 / 3)


# --------------------------------------------------------------------------- augmentation

def random_resized_crop_box(width: int, height: int, scale: tuple[float, float],
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, crop_w, crop_h): area fraction uniform in ``scale``, log-uniform aspect in [3/4, 4/3];
    after 10 misses, the largest centered crop whose aspect fits the range."""
    area = width * height
    log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    aspect = width / height
    if aspect < _RATIO[0]:
        w, h = width, round(width / _RATIO[0])
    elif aspect > _RATIO[1]:
        w, h = round(height * _RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def color_jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """torchvision ColorJitter(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1), as the official
    recipe: a random order of the four adjustments per image (order matters: each one clips to
    [0, 255]). Brightness blends with black, contrast with the image's grey mean, saturation with
    its greyscale, hue rotates H in HSV; saturation and hue leave greyscale images as they are."""
    order = rng.permutation(4)
    b, c, s, h = rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1)
    for op in order:
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(b)
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(c)
        elif img.mode == "RGB" and op == 2:
            img = ImageEnhance.Color(img).enhance(s)
        elif img.mode == "RGB" and op == 3:
            shift = int(h * 255)  # torchvision: np.uint8(hue_factor * 255), truncated, wraps mod 256
            hh, ss, vv = img.convert("HSV").split()
            hh = hh.point(lambda x: (x + shift) % 256)
            img = Image.merge("HSV", (hh, ss, vv)).convert("RGB")
    return img


def augment(img: Image.Image, rng: np.random.Generator, cfg: Config, train: bool = True) -> torch.Tensor:
    """Decoded PIL image -> normalized float32 [C, S, S]. Training: RandomResizedCrop (bicubic), jitter,
    flip. Evaluation: the official crop, shorter side to S / 0.875 (bicubic) then the centred S x S square."""
    d, m = cfg.data, cfg.model
    img = img.convert("L" if m.in_channels == 1 else "RGB")
    if train:
        left, top, w, h = random_resized_crop_box(img.width, img.height, (d.crop_scale_min, d.crop_scale_max), rng)
        img = img.resize((m.image_size, m.image_size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    else:  # torchvision Resize(R) (long side int(R * long / short)) + CenterCrop(S)
        r, s = eval_resize_size(m.image_size), m.image_size
        if img.width <= img.height:
            size = (r, int(r * img.height / img.width))
        else:
            size = (int(r * img.width / img.height), r)
        img = img.resize(size, Image.Resampling.BICUBIC)
        left, top = int(round((size[0] - s) / 2.0)), int(round((size[1] - s) / 2.0))
        img = img.crop((left, top, left + s, top + s))
    if train and d.color_jitter and rng.random() < 0.8:
        img = color_jitter(img, rng)
    if train and d.hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).reshape(m.image_size, m.image_size, m.in_channels))
    mean, std = d.normalization(m.in_channels)
    mean_t = torch.tensor(mean, dtype=torch.float32) * 255.0
    std_t = torch.tensor(std, dtype=torch.float32) * 255.0
    return ((arr - mean_t) / std_t).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------- samples

class SampleTable:
    """Random access to a source's encoded samples: bytes (None if it has no image), label, name.

    Samples are numbered globally; for shards only the tars holding samples [lo, hi) (default: all)
    are opened, each index once, here in the constructor (before DataLoader workers fork)."""

    def __init__(self, source: Source, lo: int = 0, hi: Optional[int] = None):
        self.source = source
        if source.kind == "folder":
            self.labels = np.asarray(source.labels, dtype=np.int64)
            return
        hi = source.num_samples if hi is None else hi
        shards = rank_shards(source, lo, hi)
        self.base = int(source.shard_starts()[shards.start]) if len(shards) else 0
        tar_ids, offsets, sizes, label_at = [], [], [], []
        for t in shards:
            for s in open_shard(source, t):
                ext = next((e for e in IMAGE_EXTENSIONS if e in s.components), None)
                off, size = s.components[ext] if ext else (0, -1)
                tar_ids.append(t)
                offsets.append(off)
                sizes.append(size)
                label_at.append(s.components.get("cls", (0, -1)))
        self.tar_ids = np.asarray(tar_ids, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.label_at = np.asarray(label_at, dtype=np.int64).reshape(-1, 2)
        self._files: dict[int, object] = {}
        self._pid = -1

    def __len__(self) -> int:
        return self.source.num_samples

    def _file(self, tar_id: int):
        if self._pid != os.getpid():  # DataLoader workers are forked: open our own handles
            self._files, self._pid = {}, os.getpid()
        if tar_id not in self._files:
            self._files[tar_id] = open(self.source.tars[tar_id], "rb")
        return self._files[tar_id]

    def _read(self, tar_id: int, offset: int, size: int) -> bytes:
        fh = self._file(tar_id)
        fh.seek(offset)
        return fh.read(size)

    def get(self, i: int) -> tuple[Optional[bytes], int, str]:
        if self.source.kind == "folder":
            path = self.source.files[i]
            try:
                with open(path, "rb") as fh:
                    return fh.read(), int(self.labels[i]), path
            except OSError:  # vanished or unreadable: counted as corrupt
                return None, int(self.labels[i]), path
        j = i - self.base
        t = int(self.tar_ids[j])
        name = f"{self.source.tars[t]}:{self.offsets[j]}"
        label_off, label_size = self.label_at[j]
        label = parse_label(self._read(t, int(label_off), int(label_size))) if label_size >= 0 else -1
        if self.sizes[j] < 0:
            return None, label, name
        return self._read(t, int(self.offsets[j]), int(self.sizes[j])), label, name


class _DecodeDataset(torch.utils.data.Dataset):
    """Key (epoch, batch, sample) -> (image tensor or None if corrupt, label, name, epoch, batch)."""

    def __init__(self, table: SampleTable, cfg: Config, seed: int, train: bool):
        self.table, self.cfg, self.seed, self.train = table, cfg, seed, train

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key: tuple[int, int, int]):
        epoch, batch, index = key
        data, label, name = self.table.get(index)
        image = None
        if data:
            try:
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
                    image = augment(img, np.random.default_rng([self.seed, epoch, index]), self.cfg, self.train)
            except Exception:  # corrupt or not an image: PIL raises OSError, SyntaxError, ValueError, ...
                image = None
        return image, label, name, epoch, batch


def _collate(items: list) -> dict:
    good = [it for it in items if it[0] is not None]
    epoch, batch = items[0][3], items[0][4]
    c, h, w = (good[0][0].shape if good else (0, 0, 0))
    return {"images": torch.stack([it[0] for it in good]) if good else torch.empty(0, c, h, w),
            "labels": torch.tensor([it[1] for it in good], dtype=torch.int64),
            "corrupt": [it[2] for it in items if it[0] is None], "epoch": epoch, "batch": batch}


class _EpochBatches:
    """Endless batches of keys over this rank's shard, starting at (epoch, batch)."""

    def __init__(self, lo: int, hi: int, batch_size: int, seed: int, shuffle: bool, start: tuple[int, int]):
        self.lo, self.hi, self.batch_size, self.seed, self.shuffle, self.start = lo, hi, batch_size, seed, shuffle, start

    def order(self, epoch: int) -> np.ndarray:
        idx = np.arange(self.lo, self.hi, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(idx) if self.shuffle else idx

    def __iter__(self):
        epoch, batch = self.start
        per_epoch = math.ceil((self.hi - self.lo) / self.batch_size)
        while True:
            order = self.order(epoch)
            for b in range(batch, per_epoch):
                yield [(epoch, b, int(i)) for i in order[b * self.batch_size:(b + 1) * self.batch_size]]
            epoch, batch = epoch + 1, 0


class TorchStream(SourceStream):
    def __init__(self, cfg: Config, source: Source, source_id: int, dp_rank: int, dp_size: int,
                 batch_size: int, train: bool = True):
        super().__init__(source.spec)
        self.cfg, self.batch_size, self.train = cfg, batch_size, train
        self.lo, self.hi = shard_bounds(source.num_samples, dp_rank, dp_size)
        self._base_seed = self._seed = derive_seed(cfg.train.seed, source_id, dp_rank)
        self._dataset = _DecodeDataset(SampleTable(source, self.lo, self.hi), cfg, self._seed, train)
        self._batches_per_epoch = math.ceil((self.hi - self.lo) / batch_size)
        self._next = (0, 0)   # (epoch, batch) of the next chunk
        self._iter = None
        self._loader = None

    @property
    def epoch(self) -> int:
        return self._next[0]

    def _max_empty_chunks(self) -> int:
        return self._batches_per_epoch + 1

    def _position(self) -> list[int]:
        return [*self._next, self._seed]

    def _seek(self, position: list[int]) -> None:
        self.close()
        self._next = (int(position[0]), int(position[1]))
        self._seed = self._dataset.seed = int(position[2])

    def _restart(self) -> None:
        self._seek([0, 0, self._seed])

    def _read_chunk(self) -> Chunk:
        if self._iter is None:
            workers = self.cfg.data.num_workers
            sampler = _EpochBatches(self.lo, self.hi, self.batch_size, self._seed,
                                    self.cfg.data.shuffle and self.train, self._next)
            self._loader = torch.utils.data.DataLoader(
                self._dataset, batch_sampler=sampler, num_workers=workers, collate_fn=_collate,
                prefetch_factor=4 if workers else None, worker_init_fn=_single_thread if workers else None)
            self._iter = iter(self._loader)
        chunk = next(self._iter)
        epoch, batch = chunk["epoch"], chunk["batch"] + 1
        self._next = (epoch + 1, 0) if batch == self._batches_per_epoch else (epoch, batch)
        if chunk["corrupt"]:
            self.report_corrupt(chunk["corrupt"])
        return Chunk(chunk["images"], chunk["labels"])

    def close(self) -> None:
        self._iter = None  # drops the DataLoader iterator, which shuts its workers down
        self._loader = None


def _single_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


class TorchImageLoader(ImageLoader):
    """The loader for machines without DALI (PIL + torch DataLoader)."""
    kind = "torch"

    def _make_stream(self, source: Source, source_id: int) -> SourceStream:
        return TorchStream(self.cfg, source, source_id, self.dp_rank, self.dp_size, self.micro_batch_size,
                           self.train)
