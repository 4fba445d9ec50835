"""Labelled images for the probe and the pixel baselines: Fashion-MNIST, .npz arrays, shards or
class-per-folder trees, decoded and preprocessed exactly as the trainer's validation split
(data.pil.augment with train=False: centered square, bicubic resize, normalization); a fixed
seeded subset when asked; corrupt images come back as None and are skipped by the caller.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch


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


def data_specs(data: str, train_data: Optional[str] = None, test_data: Optional[str] = None) -> dict[str, str]:
    """The source of each split: explicit --train-data/--test-data, or from --data."""
    if (train_data is None) != (test_data is None):
        raise FileNotFoundError("give both --train-data and --test-data (or neither, and --data)")
    if train_data is not None:
        return {"train": train_data, "test": test_data}
    if data == "fashion-mnist" or data.endswith(".npz"):
        return {"train": data, "test": data}
    return {split: split_spec(data, split) for split in ("train", "test")}


def collate_readable(items: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(stacked readable images or None, their labels, names of the corrupt ones) of a batch."""
    good = [it for it in items if it[0] is not None]
    images = torch.stack([it[0] for it in good]) if good else None
    return images, torch.tensor([it[1] for it in good], dtype=torch.int64), [it[2] for it in items if it[0] is None]
