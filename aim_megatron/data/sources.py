"""Data sources: what a ``data.*_sources`` entry holds, found once per job and opened per rank.

Start-up I/O must not grow with ranks x shards (a 4,096-rank job over 200k shards would otherwise
send billions of metadata operations to a shared file system at every restart). So:

- :func:`resolve_source` does the reading of one description: the manifest (one file) or, where
  there is none, the directory listing plus each index header. It never stats every tar.
- :func:`resolve_sources` is the start-up collective: rank 0 resolves every source of the config and
  broadcasts the descriptions (or the error it found) to all ranks, which keep them for the
  loaders; no other rank touches the manifest or lists a directory.
- :func:`rank_shards` picks the shards a data-parallel rank reads; :func:`open_shard` /
  :func:`check_shard` open one of them when that rank reads it. That is where a missing shard and a
  manifest count that disagrees with the shard's index are found, as one-line errors.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from aim_megatron.config import Config
from aim_megatron.data.shards import (IMAGE_EXTENSIONS, MANIFEST_NAME, WdsSample, index_num_samples,
                                      read_wds_index, read_wds_index_head, scan_tar)

logger = logging.getLogger(__name__)

_LABEL_PROBE = 16          # samples of the first shard that decide whether a source has labels
_INDEX_FIX = "tools/make_shards.py --index-only"


@dataclass
class Source:
    """A resolved ``data.train_sources`` entry: everything a rank needs without touching the data.

    For shards, ``shard_sizes[t]`` is the number of samples of ``tars[t]`` as the manifest (or,
    without one, the index header) says; sample numbering and the data-parallel split follow them,
    and :func:`open_shard` checks them against the index when a rank opens the shard."""
    spec: str
    kind: str                                     # "wds", "folder" or "synthetic"
    tars: list[str] = field(default_factory=list)
    indices: list[Optional[str]] = field(default_factory=list)   # DALI index per tar, None if absent
    files: list[str] = field(default_factory=list)               # folder: image files, sorted
    labels: list[int] = field(default_factory=list)              # folder: class per file or -1
    classes: list[str] = field(default_factory=list)
    num_samples: int = 0
    has_labels: bool = False
    shard_sizes: list[int] = field(default_factory=list)         # wds: samples per tar
    manifest: Optional[str] = None                # wds: the manifest the sizes come from, if any
    config_field: str = "data.train_sources"      # the config field that named it, for errors

    def shard_starts(self) -> np.ndarray:
        """First global sample of each tar, plus the total at the end."""
        return np.concatenate([[0], np.cumsum(np.asarray(self.shard_sizes, dtype=np.int64))])


class DataSourceError(ValueError):
    """A data source that cannot be read; the message names the config field to fix."""


def _source_error(spec: str, problem: str, field: str = "data.train_sources") -> DataSourceError:
    return DataSourceError(
        f"{field}: data source {spec!r}: {problem}. A source is a .tar shard, a directory of shards "
        f"(tools/make_shards.py writes one), a glob such as 'data/train-*.tar', an image folder "
        f"(class sub-folders give labels), or 'synthetic'; fix {field}")


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _glob_has_match(pattern: str) -> bool:
    """Whether a glob matches anything. For the usual 'dir/train-*.tar' (wildcards in the last part
    only) this reads the directory only up to the first match; glob.glob would list all of it."""
    head, tail = os.path.split(pattern)
    if _is_glob(head):
        return next(glob.iglob(pattern), None) is not None
    hidden_too = tail.startswith(".")      # glob's rule: '*' does not match dot-files
    try:
        with os.scandir(head or ".") as entries:
            return any(fnmatch.fnmatch(e.name, tail) for e in entries
                       if hidden_too or not e.name.startswith("."))
    except OSError:
        return False


def _check_path(spec: str, field: str) -> None:
    """Raise the error of a source whose path is missing (a few metadata operations, no listing)."""
    if _is_glob(spec):
        if not _glob_has_match(spec):
            raise _source_error(spec, "the glob matched no files", field)
        return
    path = Path(spec)
    if not path.exists():
        raise _source_error(spec, "the path does not exist", field)
    if path.is_file() and path.suffix != ".tar":
        raise _source_error(spec, "a file source must be a .tar shard", field)


def check_source_paths(cfg: Config) -> None:
    """Cheap start-up check that every source of every split exists (no tree walk, no reads),
    so a typo fails on every rank at once, before any process group or model exists."""
    for field, specs in (("data.train_sources", cfg.data.train_sources),
                         ("data.val_sources", cfg.data.val_sources)):
        for spec in specs:
            if spec != "synthetic":
                _check_path(spec, field)


# --------------------------------------------------------------------------- one description per job

# (field, spec) -> the Source rank 0 found, or the error it raised; filled by resolve_sources.
_shared: dict[tuple[str, str], Source | DataSourceError] = {}


def resolve_source(spec: str, field: str = "data.train_sources") -> Source:
    """``field``: the config field (or option) that named ``spec``, for the error message.
    After :func:`resolve_sources` this returns what rank 0 found, without any I/O."""
    shared = _shared.get((field, spec))
    if isinstance(shared, DataSourceError):
        raise DataSourceError(*shared.args)
    if shared is not None:
        return shared
    return _read_source(spec, field)


def resolve_sources(cfg: Config, group=None) -> dict[tuple[str, str], Source | DataSourceError]:
    """The start-up collective of every rank of ``group`` (default: all): rank 0 of the group
    resolves each source of ``data.train_sources`` and ``data.val_sources`` and broadcasts the
    descriptions; every rank keeps them, so :func:`resolve_source` and the loaders do no I/O to
    find them. A bad source does not raise here: the error is kept and raised by the
    ``resolve_source`` / ``build_loader`` call that needs it, the same on every rank.
    Without an initialised process group this resolves locally."""
    import torch.distributed as dist

    wanted = [(f, spec) for f, specs in (("data.train_sources", cfg.data.train_sources),
                                         ("data.val_sources", cfg.data.val_sources))
              for spec in dict.fromkeys(specs) if spec != "synthetic"]
    shared = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    if not shared:
        found = _describe_all(wanted)
    else:
        src = dist.get_global_rank(group, 0) if group is not None else 0
        payload = [_describe_all(wanted) if dist.get_rank() == src else None]
        dist.broadcast_object_list(payload, src=src, group=group)
        found = payload[0]
    _shared.clear()
    _shared.update(found)
    return found


def forget_shared_sources() -> None:
    """Drop what :func:`resolve_sources` kept (a later job in the same process resolves afresh)."""
    _shared.clear()


def _describe_all(wanted: list[tuple[str, str]]) -> dict[tuple[str, str], Source | DataSourceError]:
    found: dict[tuple[str, str], Source | DataSourceError] = {}
    for f, spec in wanted:
        try:
            found[(f, spec)] = _read_source(spec, f)
        except DataSourceError as exc:
            found[(f, spec)] = exc
        except (ValueError, OSError) as exc:    # a bad index header, an unreadable directory
            found[(f, spec)] = DataSourceError(f"{f}: data source {spec!r}: {_one_line(exc)}")
    return found


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_source(spec: str, field: str) -> Source:
    if spec == "synthetic":
        return Source(spec, "synthetic", num_samples=0, config_field=field)
    if _is_glob(spec):
        tars = sorted(glob.glob(spec))
        if not tars:
            raise _source_error(spec, "the glob matched no files", field)
        return _listed_wds_source(spec, tars, field)
    _check_path(spec, field)
    path = Path(spec)
    if path.is_file():
        return _listed_wds_source(spec, [str(path)], field)
    manifest = path / MANIFEST_NAME
    try:
        text = manifest.read_text()
    except FileNotFoundError:
        text = None
    if text is not None:
        return _manifest_source(spec, path, text, field)
    with os.scandir(path) as entries:
        tars = sorted(e.path for e in entries if e.name.endswith(".tar"))
    if tars:
        return _listed_wds_source(spec, tars, field)
    return _folder_source(spec, path, field)


def _manifest_source(spec: str, root: Path, text: str, field: str) -> Source:
    """Shards as the manifest lists them: one file read, no per-shard operation but the first
    shard's index (whether the source has labels)."""
    try:
        manifest = json.loads(text)
        shards = manifest.get("shards", [])
        tars = [os.path.join(root, s["tar"]) for s in shards]   # os.path: pathlib is slow at 200k
        sizes = [int(s["num_samples"]) for s in shards]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _source_error(spec, f"{MANIFEST_NAME} is not a shard manifest ({_one_line(exc)}); rebuild it "
                                  f"with tools/make_shards.py", field) from None
    manifest_path = str(root / MANIFEST_NAME)
    src = Source(spec, "wds", tars=tars, indices=[_index_path(t) for t in tars],
                 classes=list(manifest.get("classes", [])), num_samples=sum(sizes), shard_sizes=sizes,
                 manifest=manifest_path, config_field=field)
    if src.num_samples == 0:
        raise _source_error(spec, "the shards hold no samples", field)
    src.has_labels = any("cls" in s.components for s in _shard_head(src, 0))
    return src


def _index_path(tar: str) -> str:
    """name.tar -> name.idx (Path.with_suffix, without its cost per shard)."""
    return tar[:-4] + ".idx" if tar.endswith(".tar") else str(Path(tar).with_suffix(".idx"))


def _shard_head(src: Source, t: int) -> list[WdsSample]:
    """The first samples of shard ``t`` from its index (or a scan of the tar when it has none)."""
    idx = src.indices[t]
    if idx is not None:
        try:
            return read_wds_index_head(idx, _LABEL_PROBE)
        except FileNotFoundError:
            pass
    require_tars(src, [t])
    return scan_tar(src.tars[t])[:_LABEL_PROBE]


def _listed_wds_source(spec: str, tars: list[str], field: str) -> Source:
    """Shards without a manifest: the reader takes each count from the index header (or scans a
    tar that has no index). Whether an index exists comes from one listing per directory."""
    present: set[tuple[str, str]] = set()      # (directory, index file name)
    for parent in dict.fromkeys(os.path.dirname(t) for t in tars):
        with os.scandir(parent or ".") as entries:
            present.update((parent, e.name) for e in entries if e.name.endswith(".idx"))
    indices, sizes = [], []
    for tar in tars:
        idx = _index_path(tar)
        if (os.path.dirname(tar), os.path.basename(idx)) in present:
            indices.append(idx)
            sizes.append(index_num_samples(idx))
        else:
            logger.warning("%s has no DALI index (%s); scanning it (slow for big shards). Create it with "
                           "%s %s", tar, idx, _INDEX_FIX, tar)
            indices.append(None)
            sizes.append(len(scan_tar(tar)))
    src = Source(spec, "wds", tars=tars, indices=indices, num_samples=sum(sizes), shard_sizes=sizes,
                 config_field=field)
    if src.num_samples == 0:
        raise _source_error(spec, "the shards hold no samples", field)
    src.has_labels = any("cls" in s.components for s in _shard_head(src, 0))
    return src


def _folder_source(spec: str, root: Path, field: str = "data.train_sources") -> Source:
    files, labels = [], []
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_of = {c: i for i, c in enumerate(classes)}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        label = class_of[rel.parts[0]] if rel.parts else -1
        for name in sorted(filenames):
            if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                files.append(os.path.join(dirpath, name))
                labels.append(label)
    if not files:
        raise _source_error(spec, f"no .tar shards and no images ({', '.join(IMAGE_EXTENSIONS)}) found",
                            field)
    return Source(spec, "folder", files=files, labels=labels, classes=classes,
                  num_samples=len(files), has_labels=any(lb >= 0 for lb in labels), config_field=field)


# --------------------------------------------------------------------------- the shards a rank reads

def rank_shards(source: Source, lo: int, hi: int) -> range:
    """Indices of the tars holding global samples [lo, hi) (empty tars left out at the ends)."""
    starts = source.shard_starts()
    first = int(np.searchsorted(starts, lo, side="right")) - 1
    stop = int(np.searchsorted(starts, hi, side="left"))
    return range(max(first, 0), max(stop, 0)) if hi > lo else range(0)


def require_tars(source: Source, shards) -> None:
    """The missing-shard error, for the given shards of this rank (one stat each)."""
    missing = [source.tars[t] for t in shards if not os.path.isfile(source.tars[t])]
    if missing:
        listed = f"listed in {MANIFEST_NAME} " if source.manifest else ""
        raise _source_error(source.spec, f"{len(missing)} shard(s) {listed}are missing, e.g. {missing[0]}; "
                                         f"rebuild with tools/make_shards.py", source.config_field)


def count_error(source: Source, t: int, found: int, where: str) -> DataSourceError:
    """The one-line error of a shard that holds another number of samples than the description."""
    said = f"{source.manifest} says" if source.manifest else "the index header said"
    return DataSourceError(
        f"{source.config_field}: data source {source.spec!r}: shard {source.tars[t]} holds {found} samples "
        f"({where}) but {said} {source.shard_sizes[t]}; regenerate its index with {_INDEX_FIX} {source.tars[t]}, and if they "
        f"still disagree rebuild the shard set with tools/make_shards.py")


def open_shard(source: Source, t: int) -> list[WdsSample]:
    """The samples of shard ``t`` from its index (or a tar scan when it has none), checked against
    the count the description holds. The tar itself is checked to exist (one stat)."""
    require_tars(source, [t])
    idx = source.indices[t]
    if idx is not None:
        try:
            samples, where = read_wds_index(idx), f"index {idx}"
        except FileNotFoundError:
            idx = None
    if idx is None:
        logger.warning("%s has no DALI index (%s); scanning it (slow for big shards). Create it with "
                       "%s %s", source.tars[t], Path(source.tars[t]).with_suffix(".idx"), _INDEX_FIX,
                       source.tars[t])
        samples, where = scan_tar(source.tars[t]), "scanning the tar"
    if len(samples) != source.shard_sizes[t]:
        raise count_error(source, t, len(samples), where)
    return samples


def check_shard(source: Source, t: int) -> Optional[str]:
    """Shard ``t``'s index path after checking its header count (None: it has no index)."""
    idx = source.indices[t]
    if idx is None:
        return None
    try:
        n = index_num_samples(idx)
    except FileNotFoundError:
        return None
    if n != source.shard_sizes[t]:
        raise count_error(source, t, n, f"index {idx}")
    return idx
