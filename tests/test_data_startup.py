"""Data start-up I/O does not grow with ranks x shards: one rank reads the manifest, each rank opens
only the shards it reads, and a manifest that disagrees with a shard's index or lists a missing
shard is caught when that shard is opened (counted with aim_megatron/data/file_ops.py).

Run as a script under torchrun it is the 2-rank worker of test_two_gloo_ranks_touch_only_their_shards.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from aim_megatron import data
from aim_megatron.config import load_config
from aim_megatron.data.file_ops import FileOps
from aim_megatron.data.shards import shards_from_arrays
from aim_megatron.data.sources import rank_shards

ROOT = Path(__file__).resolve().parents[1]

NUM_SHARDS = 2000
GRAY16 = ["model.image_size=16", "model.patch_size=4", "model.in_channels=1"]


def make_many_shards(out: Path, num_shards: int) -> Path:
    """``num_shards`` real 2-sample shards (labels 2i, 2i+1): one shard written properly, the rest
    hard links to its tar and index, and a manifest listing them all."""
    rng = np.random.default_rng(0)
    proto = out / "proto"
    shards_from_arrays(rng.integers(0, 255, (2, 16, 16), dtype=np.uint8), np.arange(2), proto,
                       samples_per_shard=2, shuffle_seed=None, progress=False)
    record = json.loads((proto / "manifest.json").read_text())["shards"][0]
    shards = out / "shards"
    shards.mkdir()
    listed = []
    for i in range(num_shards):
        name = f"shard-{i:06d}"
        os.link(proto / record["tar"], shards / f"{name}.tar")
        os.link(proto / record["index"], shards / f"{name}.idx")
        listed.append({**record, "tar": f"{name}.tar", "index": f"{name}.idx"})
    (shards / "manifest.json").write_text(json.dumps({"format": "webdataset", "classes": [], "shards": listed}))
    return shards


def cfg_for(sources, kind="torch", dp=1, extra=()):
    return load_config(None, [f"data.train_sources={json.dumps([str(s) for s in sources])}",
                              f"data.loader={kind}", "data.num_workers=0", "train.micro_batch_size=2",
                              f"train.global_batch_size={2 * dp}", *GRAY16, *extra])


def own_files(shards: Path, src, rank: int, world: int) -> set[str]:
    lo, hi = data.shard_bounds(src.num_samples, rank, world)
    return {str(shards / f"shard-{t:06d}{ext}") for t in rank_shards(src, lo, hi) for ext in (".tar", ".idx")}


# --------------------------------------------------------------------------- 2 gloo ranks

def worker(shards: str, empty: str, out: str) -> None:
    """One rank: the start-up collective, then this rank's loader and one batch, all counted."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = cfg_for([shards], dp=world, extra=[f"data.val_sources=[{empty}]"])
    with FileOps() as ops:
        data.resolve_sources(cfg)
        resolve_calls = ops.reset()
        try:
            data.resolve_source(empty, "data.val_sources")
            val_error = None
        except data.DataSourceError as exc:
            val_error = str(exc)
        loader = data.build_loader(cfg, rank, world, 2)
        batch = next(loader)
        loader_calls = ops.reset()
    Path(f"{out}.{rank}").write_text(json.dumps({
        "resolve": resolve_calls, "loader": loader_calls, "val_error": val_error,
        "labels": batch["labels"].tolist(), "num_samples": loader.sources[0].num_samples}))
    dist.barrier()
    dist.destroy_process_group()


def test_two_gloo_ranks_touch_only_their_shards(tmp_path):
    from conftest import run_distributed
    shards = make_many_shards(tmp_path, NUM_SHARDS)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "ops.json"
    run_distributed("tests/test_data_startup.py", 2, [str(shards), str(tmp_path / "empty"), str(out)], timeout=120)
    got = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    manifest = str(shards / "manifest.json")
    src = data.resolve_source(str(shards))
    assert src.num_samples == 2 * NUM_SHARDS and all(g["num_samples"] == src.num_samples for g in got)

    # Rank 0 reads the manifest once and does not list the shards; rank 1 does no file-system
    # operation at all. (Rank 0 does list the empty val folder: it has no manifest.)
    reader = [c for c in got[0]["resolve"] if c[1].startswith(str(shards))]
    assert [c for c in reader if c[1] == manifest] == [["open", manifest]]
    assert not [c for c in reader if c[0] in ("scandir", "listdir")]
    assert len(reader) < 10, reader                           # O(1) in the number of shards
    assert got[1]["resolve"] == []
    # The empty val folder fails alike on both ranks, from rank 0's look.
    assert got[0]["val_error"] == got[1]["val_error"] and "no .tar shards and no images" in got[0]["val_error"]

    for rank, g in enumerate(got):
        mine = own_files(shards, src, rank, 2)
        assert len(mine) == NUM_SHARDS                        # half the shards, tar + index each
        touched = {path for _, path in g["loader"] if path.startswith(str(shards))}
        assert touched <= mine, sorted(touched - mine)[:5]
        assert manifest not in touched
        opened_idx = [p for op, p in g["loader"] if op == "open" and p.endswith(".idx")]
        assert len(opened_idx) == len(set(opened_idx)) == NUM_SHARDS // 2   # each of its indexes, once
        assert set(g["labels"]) <= {0, 1}                      # real samples of its own shards were read


# --------------------------------------------------------------------------- errors when a shard is opened

@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return make_many_shards(tmp_path_factory.mktemp("many"), 64)


def edited_copy(shard_set: Path, tmp_path: Path, edit) -> Path:
    """A copy of the shard set (links) whose manifest ``edit`` changed."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in shard_set.iterdir():
        if f.name != "manifest.json":
            os.link(f, copy / f.name)
    manifest = json.loads((shard_set / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.fixture(params=["torch", "dali"])
def kind(request):
    if request.param == "dali" and not data.dali_available():
        pytest.skip("NVIDIA DALI is not importable (pip install nvidia-dali-cuda130==2.4.0)")
    return request.param


def test_a_wrong_manifest_count_is_caught_when_that_shard_is_opened(shard_set, tmp_path, kind):
    def wrong_count(manifest):
        manifest["shards"][50]["num_samples"] = 3             # its index holds 2
    copy = edited_copy(shard_set, tmp_path, wrong_count)
    with FileOps() as ops:
        src = data.resolve_source(str(copy))                  # no index is read up front but the first
    assert src.num_samples == 2 * 64 + 1
    assert [p for op, p in ops.calls if p.endswith(".idx")] == [str(copy / "shard-000000.idx")]
    cfg = cfg_for([copy], kind, dp=4)
    for rank in range(3):                                     # ranks 0-2 do not read shard 50
        data.build_loader(cfg, rank, 4, 2).close()
    with pytest.raises(data.DataSourceError) as err:
        data.build_loader(cfg, 3, 4, 2)
    text = str(err.value)
    assert "\n" not in text and "shard-000050.tar holds 2 samples" in text and "says 3" in text
    assert "tools/make_shards.py --index-only" in text and text.startswith("data.train_sources:")


def test_a_missing_shard_is_caught_by_the_rank_that_reads_it(shard_set, tmp_path, kind):
    copy = edited_copy(shard_set, tmp_path, lambda m: None)
    (copy / "shard-000010.tar").unlink()
    src = data.resolve_source(str(copy))                      # no stat of every tar up front
    cfg = cfg_for([copy], kind, dp=4)
    for rank in (1, 2, 3):
        data.build_loader(cfg, rank, 4, 2).close()
    with pytest.raises(data.DataSourceError, match=r"1 shard\(s\) listed in manifest.json are missing, "
                                                   r"e.g. .*shard-000010.tar; rebuild with tools/make_shards.py"):
        data.build_loader(cfg, 0, 4, 2, sources=[src])


def test_dali_reader_gets_only_this_ranks_shards(shard_set):
    if not data.dali_available():
        pytest.skip("NVIDIA DALI is not importable")
    cfg = cfg_for([shard_set], "dali", dp=3)
    src = data.resolve_source(str(shard_set))
    seen = []
    for rank in range(3):
        loader = data.build_loader(cfg, rank, 3, 2)
        view = loader.streams[0].source
        lo, hi = data.shard_bounds(src.num_samples, rank, 3)
        assert view.tars == [src.tars[t] for t in rank_shards(src, lo, hi)] and view.num_samples == hi - lo
        # Indexes are the shards' own, or (at a cut shard) a node-local copy of this rank's part.
        assert all(i == src.indices[src.tars.index(t)] or not i.startswith(str(shard_set))
                   for t, i in zip(view.tars, view.indices))
        seen += [int(x) for b in (next(loader) for _ in range(-(-(hi - lo) // 2))) for x in b["labels"]][:hi - lo]
        loader.close()
    assert sorted(seen) == sorted([0, 1] * 64)                # every sample once across ranks (labels 0/1)


def test_shared_sources_without_a_process_group_resolve_locally(shard_set, tmp_path):
    cfg = cfg_for([shard_set], extra=[f"data.val_sources=[{tmp_path / 'nothing'}]"])
    try:
        shared = data.resolve_sources(cfg)
        assert shared[("data.train_sources", str(shard_set))].num_samples == 128
        with FileOps() as ops:
            assert data.resolve_source(str(shard_set)) is shared[("data.train_sources", str(shard_set))]
            with pytest.raises(data.DataSourceError, match="the path does not exist.*fix data.val_sources"):
                data.resolve_source(str(tmp_path / "nothing"), "data.val_sources")
        assert ops.calls == []
    finally:
        data.forget_shared_sources()


if __name__ == "__main__":
    worker(*sys.argv[1:4])
