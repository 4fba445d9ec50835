"""Checkpoint conversion one tensor at a time: memory that does not grow with the model.

A ``torch_dist`` checkpoint is a PyTorch DCP directory. Its ``.metadata`` lists every global
tensor (shape, dtype, and the chunks it was written in: one per trunk layer and TP shard), so:

- reading one layer of one key is a DCP load of that box into a preallocated tensor
  (``DistCheckpointReader``), with no model, no optimizer and no process group;
- writing a checkpoint is a DCP save whose planner produces each chunk only when the writer
  asks for it (``save_weights_only``); the files are exactly what ``checkpoint.load`` reads in
  any layout, because DCP stores tensors by global key and reshards on load;
- exports are written tensor by tensor: safetensors with its header first (shapes are known
  from the metadata), .pth/.pt as a torch.save skeleton (``torch.serialization.skip_data``)
  whose storage records are then filled in place.

The names and shapes come from the single-process model built on the meta device
(``checkpoint_slots``), so they are megatron-core's own, not a copy of its naming rules.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                   TensorProperties)
from torch.distributed.checkpoint.planner import (LoadPlan, LoadPlanner, SavePlan, SavePlanner,
                                                  TensorWriteData, WriteItem, WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from aim_megatron.checkpoint import pickled_files
from aim_megatron.checkpoint.checkpointer import CheckpointError
from aim_megatron.config import Config

# What megatron-core's torch_dist save writes next to the DCP files (checkpoint.load checks it).
DIST_CHECKPOINT_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                          "common_backend": "torch", "common_backend_version": 1}


@dataclass(frozen=True)
class Slot:
    """Where one parameter of the full model lives in a dist checkpoint."""
    key: str                  # global DCP key
    layer: Optional[int]      # index on the stacked layer axis (trunk layers), else None
    shape: tuple[int, ...]    # the parameter's own shape
    dtype: torch.dtype

    def chunk(self) -> ChunkStorageMetadata:
        if self.layer is None:
            return ChunkStorageMetadata(offsets=torch.Size([0] * len(self.shape)), sizes=torch.Size(self.shape))
        return ChunkStorageMetadata(offsets=torch.Size([self.layer] + [0] * len(self.shape)),
                                    sizes=torch.Size([1, *self.shape]))


# --------------------------------------------------------------------------- names

def checkpoint_slots(cfg: Config) -> dict[str, Slot]:
    """Full megatron parameter name -> Slot, from the single-process model's sharded state dict
    (built on the meta device: no memory). Uses a private world-of-one process group when none
    exists, so it works in a plain process and on one rank of a torchrun job alike."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing import ShardedTensor

    from aim_megatron.distributed import cpu_shims
    from aim_megatron.models.aim import AIMModel, transformer_configs
    cfg = single_process(cfg)
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("checkpoint_slots needs a process of its own (world size 1)")
    cpu_shims.install()
    had_mp = parallel_state.model_parallel_is_initialized()
    if not had_mp:
        parallel_state.initialize_model_parallel(1, 1)
    try:
        trunk_cfg, head_cfg = transformer_configs(cfg)
        trunk_cfg.perform_initialization = head_cfg.perform_initialization = False
        with torch.device("meta"):
            model = AIMModel(cfg, trunk_cfg, head_cfg, "local", True, True)
        slots = {}
        for name, sh in model.sharded_state_dict().items():
            if isinstance(sh, ShardedTensor):  # _extra_state objects are optional on load
                layer = sh.global_offset[0] if sh.prepend_axis_num else None
                slots[name] = Slot(sh.key, layer, tuple(sh.local_shape), sh.dtype)
        return slots
    finally:
        if not had_mp:
            parallel_state.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()


def single_process(cfg: Config) -> Config:
    """The config in the one-process layout (the checkpoint's keys do not depend on it)."""
    import dataclasses
    par = dataclasses.replace(cfg.parallel, tp=1, pp=1, vp=None, sequence_parallel=False,
                              trunk_layers_in_last_stage=None, use_distributed_optimizer=False,
                              overlap_grad_reduce=False, overlap_param_gather=False)
    return dataclasses.replace(cfg, parallel=par, train=dataclasses.replace(cfg.train, fp8=None))


# --------------------------------------------------------------------------- reading

class _BoxLoadPlanner(LoadPlanner):
    """Loads one box of each requested key (a trunk layer, or a whole tensor) into a tensor."""

    def __init__(self, boxes: dict[str, tuple[ChunkStorageMetadata, torch.Tensor]]):
        self.boxes = boxes

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (chunk, _) in self.boxes.items():
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError("only tensors are read")

    def resolve_tensor(self, read_item) -> torch.Tensor:
        dest = self.boxes[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: the data is in place


class DistCheckpointReader:
    """Tensors of a dist checkpoint, by full megatron name, a few at a time."""

    def __init__(self, step_dir: Path, slots: dict[str, Slot]):
        self.reader = pickled_files.CheckedFileSystemReader(step_dir, CheckpointError)
        self.metadata = self.reader.read_metadata()
        self.reader.read_metadata = lambda: self.metadata  # read .metadata once, not per load
        self.slots = slots
        stored = self.metadata.state_dict_metadata
        missing = sorted({s.key for s in slots.values() if s.key not in stored})
        if missing:
            raise CheckpointError(f"{step_dir} lacks {len(missing)} tensors of its configured model, e.g. "
                                  f"{missing[:3]}. Was it written by another version of aim-megatron?")
        for name, slot in slots.items():
            size = tuple(stored[slot.key].size)
            if size[1 if slot.layer is not None else 0:] != slot.shape or \
                    (slot.layer is not None and size[0] <= slot.layer):
                raise CheckpointError(f"{step_dir}: {slot.key} has shape {list(size)}, which does not "
                                      f"fit {name} {list(slot.shape)} of its configured model")

    def dtype(self, name: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[self.slots[name].key].properties.dtype

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, in the checkpoint's dtype (one DCP load per distinct-key round)."""
        out: dict[str, torch.Tensor] = {}
        pending = list(names)
        while pending:
            boxes, later = {}, []
            for name in pending:
                slot = self.slots[name]
                if slot.key in boxes:  # another layer of the same stacked key: next round
                    later.append(name)
                    continue
                chunk = slot.chunk()
                dest = torch.empty(tuple(chunk.sizes), dtype=self.dtype(name))
                boxes[slot.key] = (chunk, dest)
                out[name] = dest[0] if slot.layer is not None else dest
            dcp.load({k: d for k, (_, d) in boxes.items()}, storage_reader=self.reader,
                     planner=_BoxLoadPlanner(boxes), no_dist=True)
            pending = later
        return out


# --------------------------------------------------------------------------- writing a checkpoint

class _LazySavePlanner(SavePlanner):
    """A one-process DCP save of the given chunks; each is produced only when the writer
    reaches it, so at most one chunk is in memory."""

    def __init__(self, items: list[WriteItem], produce: Callable[[WriteItem], torch.Tensor]):
        self.items, self.produce = items, produce

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=True) -> None:
        pass

    def create_local_plan(self) -> SavePlan:
        return SavePlan(self.items)

    def create_global_plan(self, all_plans):
        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        return self.produce(write_item)


def write_dist_tensors(path: Path, slots: dict[str, Slot], produce: Callable[[str], torch.Tensor]) -> None:
    """DCP files (.metadata, __0_0.distcp) holding ``produce(name)`` for every slot, one chunk per
    slot: trunk layers as slices of their stacked key, as megatron-core writes them."""
    by_index: dict[tuple, str] = {}
    items = []
    for name, slot in slots.items():
        chunk = slot.chunk()
        index = MetadataIndex(slot.key, chunk.offsets)
        by_index[(slot.key, tuple(chunk.offsets))] = name
        global_size = list(slot.shape)
        if slot.layer is not None:
            global_size = [max(s.layer for s in slots.values() if s.key == slot.key) + 1, *slot.shape]
        items.append(WriteItem(index=index, type=WriteItemType.SHARD,
                               tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=slot.dtype),
                                                           size=torch.Size(global_size))))

    def resolve(item: WriteItem) -> torch.Tensor:
        name = by_index[(item.index.fqn, tuple(item.index.offset))]
        slot = slots[name]
        t = produce(name).to(slot.dtype)
        if tuple(t.shape) != slot.shape:
            raise ValueError(f"{name}: got shape {list(t.shape)}, the model has {list(slot.shape)}")
        return t.reshape(tuple(item.tensor_data.chunk.sizes)).contiguous()

    # One file per chunk: torch's writer keeps every tensor of a file until the file is closed.
    dcp.save({}, storage_writer=dcp.FileSystemWriter(str(path), single_file_per_rank=False, thread_count=1),
             planner=_LazySavePlanner(items, resolve), no_dist=True)


def save_weights_only(root: Path, step: int, cfg: Config, produce: Callable[[str], torch.Tensor],
                      trainer_state: dict) -> Path:
    """A checkpoint of the model weights alone, written tensor by tensor, in the directory
    layout of ``checkpoint.save`` (tmp dir renamed when complete, then ``latest``). It records
    ``weights_only``: ``checkpoint.load`` then loads the model and leaves the optimizer and LR
    schedule freshly built (a fresh import's Adam moments are zero anyway)."""
    from aim_megatron.checkpoint import checkpointer as checkpoint
    root = Path(root)
    final = root / checkpoint.step_dir_name(step)
    tmp = root / f".tmp_{final.name}"
    if final.exists():
        raise CheckpointError(f"{final} already exists; write into a new directory")
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_dist_tensors(tmp, checkpoint_slots(cfg), produce)
    torch.save({"trainer": trainer_state}, tmp / "common.pt")
    (tmp / "metadata.json").write_text(json.dumps(DIST_CHECKPOINT_CONFIG))
    meta = {"format": checkpoint.FORMAT_VERSION, "step": step, "config": cfg.to_dict(),
            "layout": None, "weights_only": True}
    checkpoint._write_atomic(tmp / checkpoint.META_FILE, json.dumps(meta, indent=2))
    os.replace(tmp, final)
    checkpoint._write_atomic(root / checkpoint.LATEST_FILE, final.name)
    return final


# --------------------------------------------------------------------------- single-file inputs

class TensorFile:
    """A .safetensors or torch.save file read one tensor at a time with plain reads at the
    tensor's offset (no memory map, so nothing of the file stays resident). ``meta`` holds the
    tensors on the meta device (names, shapes, dtypes)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.suffix == ".safetensors":
            with open(self.path, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            dtypes = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
            self.meta = {k: torch.empty(v["shape"], dtype=dtypes[v["dtype"]], device="meta") for k, v in header.items()}
            self._at = {k: 8 + size + v["data_offsets"][0] for k, v in header.items()}
        else:  # torch.save zip: the pickle alone, each storage's offset in the file comes with it
            self.meta = torch.load(self.path, map_location="meta", weights_only=True)
            for wrapper in ("state_dict", "model"):  # some releases nest the weights
                if isinstance(self.meta, dict) and isinstance(self.meta.get(wrapper), dict):
                    self.meta = self.meta[wrapper]
            self._at = {k: v.untyped_storage()._checkpoint_offset for k, v in self.meta.items()
                        if torch.is_tensor(v)}

    def get(self, key: str) -> torch.Tensor:
        m = self.meta[key]
        if self.path.suffix == ".safetensors":
            t = torch.empty(m.shape, dtype=m.dtype)
            self._read_into(t, self._at[key])
            return t
        storage = torch.empty(m.untyped_storage().nbytes() // m.element_size(), dtype=m.dtype)
        self._read_into(storage, self._at[key])
        return storage.as_strided(m.shape, m.stride(), m.storage_offset())

    def _read_into(self, t: torch.Tensor, offset: int) -> None:
        with open(self.path, "rb") as f:
            f.seek(offset)
            view = t.reshape(-1).view(torch.uint8).numpy()
            if f.readinto(view) != t.nbytes:
                raise ValueError(f"{self.path} ends before the tensor at byte {offset}")


# --------------------------------------------------------------------------- single-file outputs

_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                       torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The tensor's raw bytes without a copy (bf16 has no numpy dtype: go through uint8)."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def safetensors_order(specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> list[str]:
    """safetensors' own file order (wider dtypes first, then by name), so a streamed file is
    byte-identical to ``save_file`` of the same tensors."""
    return sorted(specs, key=lambda n: (-torch.empty(0, dtype=specs[n][1]).element_size(), n))


def write_safetensors(out: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                      tensors: Iterator[tuple[str, torch.Tensor]], metadata: Optional[dict] = None) -> None:
    """Header first (shapes and dtypes are known), then each tensor as it comes; ``tensors``
    must yield the names in ``safetensors_order(specs)``."""
    order = safetensors_order(specs)
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in order:
        shape, dtype = specs[name]
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
    with _replaced_when_done(out) as part, open(part, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for expected, (name, t) in zip(order, tensors, strict=True):
            if name != expected or tuple(t.shape) != tuple(specs[name][0]) or t.dtype != specs[name][1]:
                raise ValueError(f"safetensors stream: expected {expected} {specs[expected]}, got {name} "
                                 f"{tuple(t.shape)} {t.dtype}")
            f.write(_bytes_of(t))


def write_torch_save(out: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                     tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """A torch.save file of ``{name: tensor}`` (keys in ``specs`` order), filled tensor by tensor:
    torch writes the skeleton (pickle, zip records with space for every storage; the empty
    tensors are never touched, so take no memory), then each tensor's bytes go to its record's
    offset and the zip CRCs are set, so zip tools and torch.load both accept the file."""
    skeleton = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in specs.items()}
    with _replaced_when_done(out) as part:
        with torch.serialization.skip_data():
            torch.save(skeleton, part)
        del skeleton
        located = torch.load(part, map_location="meta", weights_only=True)
        offsets = {name: t.untyped_storage()._checkpoint_offset for name, t in located.items()}
        crcs = {}
        with open(part, "r+b") as f:
            for name, t in tensors:
                if tuple(t.shape) != tuple(specs[name][0]) or t.dtype != specs[name][1]:
                    raise ValueError(f"torch.save stream: {name} is {tuple(t.shape)} {t.dtype}, "
                                     f"expected {specs[name]}")
                data = _bytes_of(t)
                f.seek(offsets[name])
                f.write(data)
                crcs[offsets[name]] = zlib.crc32(data)
            if len(crcs) != len(specs):
                raise ValueError(f"torch.save stream: {len(crcs)} of {len(specs)} tensors written")
            _set_zip_crcs(f, crcs)


def _set_zip_crcs(f, crc_at_data_offset: dict[int, int]) -> None:
    """Write CRC-32s of records filled after the fact: torch's zip writer puts them in a data
    descriptor after the data and in the central directory."""
    import zipfile
    with zipfile.ZipFile(f) as z:
        infos = z.infolist()
        central = z.start_dir
    f.seek(central)
    directory = bytearray(f.read())
    pos = 0
    for info in infos:  # central directory entries, in order: fixed 46 bytes + name + extra + comment
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", directory, pos + 28)
        f.seek(info.header_offset + 26)
        local_name_len, local_extra_len = struct.unpack("<HH", f.read(4))
        data_offset = info.header_offset + 30 + local_name_len + local_extra_len
        crc = crc_at_data_offset.get(data_offset)
        if crc is not None:
            struct.pack_into("<I", directory, pos + 16, crc)
            f.seek(data_offset + info.compress_size)
            signature = f.read(4)
            f.seek(data_offset + info.compress_size + (4 if signature == b"PK\x07\x08" else 0))
            f.write(struct.pack("<I", crc))
        pos += 46 + name_len + extra_len + comment_len
    f.seek(central)
    f.write(directory)


class _replaced_when_done:
    """A temporary path in a directory of its own next to ``out`` (torch.save names the archive
    after the file's stem, so the temporary file has ``out``'s name), renamed onto ``out`` only
    when complete: an interrupted export leaves no half-written file under the final name."""

    def __init__(self, out: Path):
        self.out = Path(out)

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        return self.dir / self.out.name

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.dir / self.out.name, self.out)
        shutil.rmtree(self.dir, ignore_errors=True)


def write_single_file(out: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                      read: Callable[[list[str]], dict[str, torch.Tensor]],
                      metadata: Optional[dict] = None, batch: int = 8) -> None:
    """Write ``read(names)`` for every name of ``specs`` to a .safetensors or .pth/.pt file,
    reading ``batch`` tensors at a time in the file's order."""
    out = Path(out)
    order = safetensors_order(specs) if out.suffix == ".safetensors" else list(specs)

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for i in range(0, len(order), batch):
            got = read(order[i:i + batch])
            for name in order[i:i + batch]:
                yield name, got.pop(name)

    if out.suffix == ".safetensors":
        write_safetensors(out, specs, stream(), metadata)
    else:
        write_torch_save(out, {n: specs[n] for n in order}, stream())


# --------------------------------------------------------------------------- export

def export_checkpoint(step_dir: Path, out: Path, names: str = "official",
                      keep: Callable[[str], bool] = lambda name: True,
                      extra: Optional[dict[str, torch.Tensor]] = None,
                      metadata: Optional[dict] = None) -> tuple[int, int]:
    """Write a checkpoint's weights (fp32) to one .safetensors/.pth file, tensor by tensor:
    ``names`` "official" (released key names and qkv row order) or "megatron" (full megatron
    names, sorted), those for which ``keep(name)``; then ``extra`` tensors (a probe head).
    Returns (tensors, parameters) written."""
    from aim_megatron.checkpoint import checkpointer as checkpoint
    from aim_megatron.checkpoint.official import megatron_to_reference, name_map
    cfg = checkpoint.config_from_checkpoint(step_dir)
    slots = checkpoint_slots(cfg)
    reader = DistCheckpointReader(step_dir, slots)
    pairs = name_map(cfg.model) if names == "official" else {n: n for n in sorted(slots)}
    source = {new: old for old, new in pairs.items() if keep(new)}
    extra = extra or {}
    specs = {new: (slots[old].shape, torch.float32) for new, old in source.items()}
    specs.update({k: (tuple(v.shape), v.dtype) for k, v in extra.items()})

    def read(batch: list[str]) -> dict[str, torch.Tensor]:
        got = reader.read([source[n] for n in batch if n in source])
        out = {}
        for n in batch:
            if n in extra:
                out[n] = extra[n].contiguous()
            elif names == "official":  # renames and permutes the qkv rows
                out[n] = megatron_to_reference({source[n]: got.pop(source[n])}, cfg.model,
                                               strict=False)[n].float().contiguous()
            else:
                out[n] = got.pop(source[n]).float()
        return out

    write_single_file(out, specs, read, metadata)
    return len(specs), sum(torch.Size(s).numel() for s, _ in specs.values())
