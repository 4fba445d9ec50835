"""The pickled files of a checkpoint directory, read without running code they carry.

torch's ``FileSystemReader.read_metadata`` (and megatron-core's torch_dist loader through it) reads
a torch.distributed.checkpoint ``.metadata`` with plain ``pickle.load``: a checkpoint directory
from someone else could run any code it carries the moment it is opened. Here that pickle is read
with an allow-list of the classes DCP writes (its metadata dataclasses and enums, ``torch.Size``,
dtypes, layouts, paths); any other global refuses the file with one line naming it.

Two more pickles sit in a megatron-core checkpoint: DCP loads each non-tensor entry of the
``.distcp`` files (megatron's ShardedObjects, e.g. the layers' ``_extra_state``) with
``torch.load(weights_only=False)``, and megatron-core reads ``common.pt`` with torch.load's
default (weights_only=True only from torch 2.6). ``check`` reads both with weights_only=True
before megatron-core does, and refuses a hostile one in one line (not with torch's advice to retry
with weights_only=False). ``check`` guards a load through megatron-core;
``CheckedFileSystemReader`` replaces ``dcp.FileSystemReader`` where we read DCP ourselves (exports,
ml-l3m imports: they read tensors only, never the object entries).
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

METADATA_NAME = ".metadata"
COMMON_NAME = "common.pt"   # megatron-core's non-sharded state: trainer, RNG and data-loader states

_PATHS = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}

# Every global a DCP .metadata pickle names (torch 2.x, megatron-core torch_dist, FSDP2 DCP).
# Building any of these runs only dataclass/enum constructors.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadItemType"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},   # a layout by its name, from a fixed table
    "collections": {"OrderedDict"},
    # StorageMeta.checkpoint_id is the path the writer was given, a Path object for some writers
    # (the streamed imports' among them); building one touches no file. pathlib._local: Python 3.13+.
    "pathlib": _PATHS,
    "pathlib._local": _PATHS,
    "builtins": {"set", "frozenset"},
}


class _RefusedGlobal(Exception):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _RefusedGlobal(module, name)


def read_dcp_metadata(path: Path, error: type[Exception]) -> Any:
    """The unpickled ``.metadata`` file at ``path``; raises ``error`` (one line) when the pickle
    names anything outside the allow-list. A damaged pickle raises what ``pickle.load`` would."""
    with open(path, "rb") as f:
        try:
            return _MetadataUnpickler(f).load()
        except _RefusedGlobal as exc:
            raise error(f"{path} asks to run pickled {exc}, which no torch.distributed.checkpoint "
                        f"metadata holds: refused, it could run code on this machine. Load only "
                        f"checkpoints written by aim-megatron or torch.distributed.checkpoint") from None


def refusal_reason(exc: Exception) -> str:
    """What torch's weights_only refusal says it would not load (a global, an opcode), without
    its advice to load the file with weights_only=False."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(boilerplate)]
    return " ".join(reasons) or type(exc).__name__


def check(step_dir: Path, error: type[Exception]) -> None:
    """Before megatron-core reads ``step_dir``: raise ``error`` (one line) if its ``.metadata``
    names a global outside the allow-list, or its ``common.pt`` holds more than weights_only
    loads. A missing or damaged file is left for megatron-core to report as it always has."""
    metadata_file, common = Path(step_dir) / METADATA_NAME, Path(step_dir) / COMMON_NAME
    metadata = None
    if metadata_file.is_file():
        try:
            metadata = read_dcp_metadata(metadata_file, error)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                IndexError, KeyError, ImportError):
            pass
    if metadata is not None:
        _check_dcp_objects(Path(step_dir), metadata, error)
    if common.is_file():
        with open(common, "rb") as f:
            # megatron-core loads it with weights_only=True (torch >= 2.6): damage is its to report.
            _check_weights_only(f, common, error, strict=False)


def _check_weights_only(f, where: str, error: type[Exception], strict: bool) -> None:
    """Raise ``error`` if torch.load(weights_only=True) refuses ``f`` for a global it would have
    to build, or with ``strict`` for any reason at all (the later reader does not restrict, so a
    pickle torch's checker cannot follow, e.g. a newer protocol, could hide a payload from it).
    Without ``strict`` damage is left for the real reader to report."""
    try:
        torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        if strict or (isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in str(exc)):
            raise error(f"{where} holds more than tensors and plain values, refused: it could run "
                        f"code on this machine ({refusal_reason(exc)})") from None


def _check_dcp_objects(step_dir: Path, metadata: Any, error: type[Exception]) -> None:
    """DCP's default load planner (megatron-core's too) reads every non-tensor entry (megatron's
    ShardedObjects: the layers' _extra_state) with torch.load(weights_only=False); each such entry
    is read here with weights_only=True first."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        path = step_dir / info.relative_path
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except OSError:
            continue
        if len(data) < info.length:  # a truncated file: damage, for megatron-core to report
            continue
        _check_weights_only(io.BytesIO(data), f"{path} (entry {index.fqn})", error, strict=True)


class CheckedFileSystemReader(FileSystemReader):
    """``dcp.FileSystemReader`` whose ``.metadata`` is read once, through the allow-list."""

    def __init__(self, path: str | Path, error: type[Exception]):
        super().__init__(str(path))
        self._error = error
        self._metadata: dict = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        rank = kwargs.get("rank")
        if rank not in self._metadata:
            self._metadata[rank] = read_dcp_metadata(Path(self._get_metadata_path(rank)), self._error)
        metadata = self._metadata[rank]
        # What FileSystemReader.read_metadata does after its unpickling.
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
