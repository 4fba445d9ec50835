"""WebDataset shards: writing them (with DALI index files), reading their indices, checking images.

A shard is a plain POSIX tar. Sample ``k`` is stored as ``{k:09d}.jpg`` (or ``.png``) plus, when the
source has labels, ``{k:09d}.cls`` holding the class as ASCII digits. Next to ``name.tar`` lies
``name.idx``, the index DALI's webdataset reader takes (format v1.2): a header ``v1.2 <num_samples>``
and one line per sample with ``<ext> <data_offset> <size> <member_name>`` for each component.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

# Formats both loaders accept: the DALI path can check JPEG/PNG completeness from their markers.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
WDS_INDEX_VERSION = "v1.2"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"


# --------------------------------------------------------------------------- image checks

def image_format(data: bytes) -> Optional[str]:
    """'jpeg' or 'png' when the bytes start *and end* like a complete file of that format, else None.

    This is the cheap test the DALI pipeline applies per sample (a truncated file lacks its end
    marker); a full decode is still needed to catch damage in the middle.
    """
    if len(data) >= 4 and data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9":
        return "jpeg"
    if len(data) >= 20 and data[:8] == _PNG_SIGNATURE and data[-8:] == _PNG_IEND:
        return "png"
    return None


def decode_error(data: bytes) -> Optional[str]:
    """Why the bytes are not a fully decodable image, or None when they are."""
    if not data:
        return "empty file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
    except Image.UnidentifiedImageError:
        return "not an image (unrecognized format)"
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"{type(exc).__name__}: {exc}"
    return None


def normalize_image_bytes(data: bytes, max_side: Optional[int] = None,
                          quality: int = 90) -> tuple[bytes, str]:
    """Bytes a shard can store: a complete JPEG or PNG, optionally downscaled to ``max_side``.

    JPEGs with junk after their end marker are trimmed, other formats (WebP, BMP, TIFF, GIF, ...)
    are re-encoded losslessly as PNG, so every stored sample passes :func:`image_format`.
    Raises ValueError for bytes that do not decode.
    """
    err = decode_error(data)
    if err is not None:
        raise ValueError(err)
    with Image.open(io.BytesIO(data)) as img:
        fmt = (img.format or "").upper()
        if max_side is not None and max(img.size) > max_side:
            img = _rgb_or_gray(img)
            scale = max_side / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.BICUBIC)
            return _encode(img, "JPEG", quality), "jpg"
        if fmt == "JPEG":
            end = data.rfind(b"\xff\xd9")
            trimmed = data[:end + 2]
            if image_format(trimmed) == "jpeg" and decode_error(trimmed) is None:
                return trimmed, "jpg"
            return _encode(_rgb_or_gray(img), "JPEG", 95), "jpg"
        if fmt == "PNG" and image_format(data) == "png":
            return data, "png"
        return _encode(_rgb_or_gray(img), "PNG"), "png"


def _rgb_or_gray(img: Image.Image) -> Image.Image:
    return img if img.mode in ("L", "RGB") else img.convert("L" if img.mode in ("1", "I", "I;16", "F")
                                                           else "RGB")


def _encode(img: Image.Image, fmt: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


# --------------------------------------------------------------------------- labelled arrays

def read_idx(path: str | Path) -> np.ndarray:
    """An IDX array (the MNIST / Fashion-MNIST format), gzip-compressed or plain."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} not found; for Fashion-MNIST run scripts/install_data.sh")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if zero != 0 or dtype_code not in dtypes:
        raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values (truncated?)")
    return data.reshape(shape).astype(dtypes[dtype_code][1:])


def array_to_png(image: np.ndarray) -> bytes:
    """A uint8 [H, W] or [H, W, 3] array as lossless PNG bytes."""
    return _encode(Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)), "PNG")


# --------------------------------------------------------------------------- index files

@dataclass
class WdsSample:
    """Where the components of one sample lie inside its tar: ext -> (data offset, size)."""
    key: str
    components: dict[str, tuple[int, int]] = field(default_factory=dict)


def _split_member(name: str) -> Optional[tuple[str, str]]:
    base = name.rsplit("/", 1)[-1]
    if base.startswith(".") or "." not in base:  # DALI ignores dot-files as well
        return None
    stem, ext = base.split(".", 1)
    prefix = name[: len(name) - len(base)]
    return prefix + stem, ext.lower()


def scan_tar(tar_path: str | Path) -> list[WdsSample]:
    """Samples of a tar in stored order, grouped by member name without extension."""
    samples: dict[str, WdsSample] = {}
    with tarfile.open(tar_path, "r:") as tf:
        for member in tf:
            if not member.isfile():
                continue
            split = _split_member(member.name)
            if split is None:
                continue
            key, ext = split
            samples.setdefault(key, WdsSample(key)).components[ext] = (member.offset_data, member.size)
    return list(samples.values())


def write_wds_index(tar_path: str | Path, index_path: Optional[str | Path] = None) -> Path:
    """Write the DALI index for a tar (default: same name with .idx); returns its path."""
    tar_path = Path(tar_path)
    index_path = Path(index_path) if index_path else tar_path.with_suffix(".idx")
    with tarfile.open(tar_path, "r:") as tf:
        members = [m for m in tf if m.isfile() and _split_member(m.name) is not None]
    grouped: dict[str, list[tarfile.TarInfo]] = {}
    for m in members:
        grouped.setdefault(_split_member(m.name)[0], []).append(m)
    lines = [f"{WDS_INDEX_VERSION} {len(grouped)}"]
    for comps in grouped.values():
        lines.append(" ".join(f"{_split_member(m.name)[1]} {m.offset_data} {m.size} {m.name}"
                              for m in comps))
    index_path.write_text("\n".join(lines) + "\n")
    return index_path


def _index_header(index_path: str | Path, first_line: str) -> int:
    header = first_line.split()
    if len(header) != 2 or header[0] != WDS_INDEX_VERSION:
        raise ValueError(f"{index_path}: expected a '{WDS_INDEX_VERSION} <n>' header; regenerate it with "
                         f"tools/make_shards.py --index-only")
    return int(header[1])


def _index_sample(line: str) -> WdsSample:
    fields = line.split()
    sample = WdsSample(key="")
    for i in range(0, len(fields), 4):
        ext, offset, size, name = fields[i:i + 4]
        sample.components[ext.lower()] = (int(offset), int(size))
        sample.key = _split_member(name)[0]
    return sample


def read_wds_index(index_path: str | Path) -> list[WdsSample]:
    lines = Path(index_path).read_text().splitlines()
    count = _index_header(index_path, lines[0] if lines else "")
    samples = [_index_sample(line) for line in lines[1:]]
    if len(samples) != count:
        raise ValueError(f"{index_path}: header says {count} samples, found {len(samples)}")
    return samples


def read_wds_index_head(index_path: str | Path, n: int) -> list[WdsSample]:
    """The first ``n`` samples of an index, reading no further into the file."""
    with open(index_path) as fh:
        _index_header(index_path, fh.readline())
        lines = [line for _, line in zip(range(n), fh)]
    return [_index_sample(line) for line in lines if line.strip()]


def write_wds_index_subset(index_path: str | Path, out_path: str | Path, start: int, stop: int) -> int:
    """Write an index of samples [start, stop) of ``index_path`` (a valid DALI index of the same tar,
    listing only those samples); returns how many samples the full index holds."""
    lines = Path(index_path).read_text().splitlines()
    count = _index_header(index_path, lines[0] if lines else "")
    body = lines[1:]
    if len(body) != count:
        raise ValueError(f"{index_path}: header says {count} samples, found {len(body)}")
    part = body[start:stop]
    Path(out_path).write_text("\n".join([f"{WDS_INDEX_VERSION} {len(part)}", *part]) + "\n")
    return count


def index_num_samples(index_path: str | Path) -> int:
    with open(index_path) as fh:
        return _index_header(index_path, fh.readline())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- writing shards

class ShardWriter:
    """Append samples to numbered tar shards of at most ``samples_per_shard`` samples.

    Each finished shard gets its DALI index and a sha256; :meth:`close` returns their records.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", samples_per_shard: int = 10000):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.samples_per_shard = prefix, samples_per_shard
        self.shards: list[dict] = []
        self.num_samples = 0
        self._tar: Optional[tarfile.TarFile] = None
        self._in_shard = 0

    def write(self, image: bytes, ext: str, label: Optional[int] = None) -> None:
        if self._tar is None:
            path = self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar"
            self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        key = f"{self.num_samples:09d}"
        self._add(f"{key}.{ext}", image)
        if label is not None:
            self._add(f"{key}.cls", str(int(label)).encode())
        self.num_samples += 1
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self._finish_shard()

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed mtime: reproducible shards
        self._tar.addfile(info, io.BytesIO(data))

    def _finish_shard(self) -> None:
        tar_path = Path(self._tar.name)
        self._tar.close()
        self._tar = None
        idx_path = write_wds_index(tar_path)
        self.shards.append({"tar": tar_path.name, "index": idx_path.name, "num_samples": self._in_shard,
                            "bytes": tar_path.stat().st_size, "sha256": sha256_file(tar_path),
                            "index_sha256": sha256_file(idx_path)})
        self._in_shard = 0

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._finish_shard()
        return self.shards

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


MANIFEST_NAME = "manifest.json"


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def verify_manifest(out_dir: str | Path) -> list[str]:
    """Problems found re-hashing the shards a manifest lists (empty list: all good)."""
    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    problems = []
    for shard in manifest["shards"]:
        for key, digest in (("tar", "sha256"), ("index", "index_sha256")):
            path = out_dir / shard[key]
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif sha256_file(path) != shard[digest]:
                problems.append(f"{path}: sha256 mismatch")
    return problems


def iter_tar_images(tar_path: str | Path, samples: Optional[list[WdsSample]] = None
                    ) -> Iterator[tuple[WdsSample, Optional[bytes], int]]:
    """(sample, image bytes or None when it has no image component, label or -1) for each sample."""
    samples = scan_tar(tar_path) if samples is None else samples
    with open(tar_path, "rb") as fh:
        for s in samples:
            ext = next((e for e in IMAGE_EXTENSIONS if e in s.components), None)
            data = None
            if ext is not None:
                off, size = s.components[ext]
                fh.seek(off)
                data = fh.read(size)
            label = -1
            if "cls" in s.components:
                off, size = s.components["cls"]
                fh.seek(off)
                label = parse_label(fh.read(size))
            yield s, data, label


def parse_label(raw: bytes) -> int:
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return -1


# --------------------------------------------------------------------------- building shard sets

def _prepare_file(args: tuple[str, Optional[int]]) -> tuple[Optional[bytes], str]:
    """(bytes, ext) of a storable image, or (None, reason) for a file that must be skipped."""
    path, max_side = args
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        return None, f"unreadable: {exc}"
    try:
        return normalize_image_bytes(data, max_side)
    except ValueError as exc:
        return None, str(exc)


def _reason_kind(reason: str) -> str:
    if reason == "empty file":
        return "empty"
    if "truncated" in reason or "Truncated" in reason or "premature" in reason.lower():
        return "truncated"
    if reason.startswith("not an image"):
        return "not an image"
    return "corrupt"


def list_folder(root: str | Path) -> tuple[list[str], list[int], list[str]]:
    """Every regular file under ``root`` (sorted), its class (first sub-folder, -1 at top level), classes."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; pass an existing directory "
                                f"(--folder of tools/make_shards.py)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_of = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if os.path.isfile(path):
                files.append(path)
                labels.append(class_of[rel.parts[0]] if rel.parts else -1)
    return files, labels, classes


def shards_from_folder(root: str | Path, out_dir: str | Path, prefix: str = "shard",
                       samples_per_shard: int = 10000, max_side: Optional[int] = None,
                       shuffle_seed: Optional[int] = 0, workers: int = 1, limit: Optional[int] = None,
                       progress: bool = True) -> dict:
    """Shards from an image folder; class sub-folders become labels. Corrupt, truncated, empty and
    non-image files are skipped and listed in the manifest. Returns the manifest."""
    from tqdm import tqdm

    files, labels, classes = list_folder(root)
    if not files:  # before the output directory is created
        raise ValueError(f"image folder {root} holds no files; pass the folder that holds the images "
                         f"(or their class sub-folders)")
    order = np.arange(len(files))
    if shuffle_seed is not None:  # shuffled once here, since DALI only shuffles through a buffer
        order = np.random.default_rng(shuffle_seed).permutation(len(files))
    if limit is not None:
        order = order[:limit]
    has_labels = any(lb >= 0 for lb in labels)
    skipped: list[dict] = []
    jobs = [(files[i], max_side) for i in order]
    with ShardWriter(out_dir, prefix, samples_per_shard) as writer:
        if workers > 1:
            import multiprocessing as mp
            pool = mp.get_context("fork").Pool(workers)
            results = pool.imap(_prepare_file, jobs, chunksize=4)
        else:
            pool, results = None, map(_prepare_file, jobs)
        try:
            for i, (data, info) in zip(order, tqdm(results, total=len(jobs), desc="shards", unit="img",
                                                    disable=not progress)):
                if data is None:
                    skipped.append({"item": files[i], "kind": _reason_kind(info), "reason": info})
                else:
                    writer.write(data, info, labels[i] if has_labels else None)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        shards = writer.close()
        num_samples = writer.num_samples
    if num_samples == 0:
        raise ValueError(f"no decodable images under {root} ({len(skipped)} files skipped)")
    return _finish_manifest(out_dir, str(root), "folder", num_samples, skipped, classes if has_labels else [],
                            shards, max_side, shuffle_seed)


def shards_from_arrays(images: np.ndarray, labels: Optional[np.ndarray], out_dir: str | Path,
                       prefix: str = "shard", samples_per_shard: int = 10000, classes: Optional[list[str]] = None,
                       source: str = "arrays", shuffle_seed: Optional[int] = 0, limit: Optional[int] = None,
                       progress: bool = True) -> dict:
    """Shards from uint8 image arrays [N, H, W] or [N, H, W, 3] (stored as PNG) with optional labels."""
    from tqdm import tqdm

    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W] or [N, H, W, 3], got {images.dtype} {images.shape}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    order = np.arange(len(images))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(images))
    if limit is not None:
        order = order[:limit]
    with ShardWriter(out_dir, prefix, samples_per_shard) as writer:
        for i in tqdm(order, desc="shards", unit="img", disable=not progress):
            writer.write(array_to_png(images[i]), "png", None if labels is None else int(labels[i]))
        shards = writer.close()
        num_samples = writer.num_samples
    return _finish_manifest(out_dir, source, "arrays", num_samples, [], classes or [], shards, None, shuffle_seed)


def _finish_manifest(out_dir, source: str, kind: str, num_samples: int, skipped: list[dict],
                     classes: list[str], shards: list[dict], max_side, shuffle_seed) -> dict:
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s["kind"]] = counts.get(s["kind"], 0) + 1
    manifest = {
        "format": "webdataset", "index_format": f"DALI {WDS_INDEX_VERSION}", "created_by": "tools/make_shards.py",
        "source": source, "source_kind": kind, "num_samples": num_samples, "num_skipped": len(skipped),
        "skipped_by_kind": counts, "skipped": skipped[:1000], "classes": classes, "max_side": max_side,
        "shuffle_seed": shuffle_seed, "num_shards": len(shards), "shards": shards,
    }
    write_manifest(out_dir, manifest)
    return manifest
