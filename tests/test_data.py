"""Training loaders (DALI and the torch fallback, same tests): batch contract, real JPEG decoding,
corrupt samples, disjoint/complete DP sharding, weighted mixing and bit-exact mid-epoch resume."""
import json
import logging

import numpy as np
import pytest
import torch

from aim_megatron import data as data_mod
from aim_megatron.config import load_config
from aim_megatron.data import (SyntheticLoader, assign_sources, build_loader, microbatch_prefix_lengths,
                               prefix_lengths, resolve_source, sample_positions, select_loader_kind,
                               shard_bounds)
from aim_megatron.data.local_datasets import fashion_mnist
from samples import make_real_jpeg_folder, REAL_JPEGS
from aim_megatron.data.shards import ShardWriter, shards_from_arrays

GRAY28 = ["model.image_size=28", "model.patch_size=4", "model.in_channels=1"]
RGB32 = ["model.image_size=32", "model.patch_size=8", "model.in_channels=3"]


@pytest.fixture(params=["torch", "dali"])
def kind(request):
    if request.param == "dali" and not data_mod.dali_available():
        pytest.skip("NVIDIA DALI is not importable (pip install nvidia-dali-cuda130==2.4.0)")
    return request.param


def make_cfg(sources, kind, mbs, dp=1, extra=()):
    return load_config(None, [f"data.train_sources={json.dumps([str(s) for s in sources])}",
                              f"data.loader={kind}", "data.num_workers=1", f"train.micro_batch_size={mbs}",
                              f"train.global_batch_size={mbs * dp}", *extra])


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """Two shard sets of real Fashion-MNIST images whose label is their sample index (identity)."""
    images, _ = fashion_mnist("test")
    a, b = tmp_path_factory.mktemp("idx_a"), tmp_path_factory.mktemp("idx_b")
    shards_from_arrays(images[:23], np.arange(23), a, samples_per_shard=10, shuffle_seed=None, progress=False)
    shards_from_arrays(images[100:117], 1000 + np.arange(17), b, samples_per_shard=10, shuffle_seed=None,
                       progress=False)
    return a, b


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return root, make_real_jpeg_folder(root)


@pytest.fixture(scope="module")
def corrupt_shard(tmp_path_factory, real_folder):
    """A shard written without checks: 16 real JPEGs with a truncated JPEG, text and an empty member."""
    _, files = real_folder
    out = tmp_path_factory.mktemp("corrupt")
    with ShardWriter(out, samples_per_shard=100) as w:
        for i, path in enumerate(files["good"]):
            w.write(path.read_bytes(), "jpg", i)
            if i in (3, 9, 14):
                bad = files["bad"][(3, 9, 14).index(i)]
                w.write(bad.read_bytes(), "jpg", -5)
    return out


def take(loader, n):
    return [next(loader) for _ in range(n)]


def denormalize(images, cfg):
    mean, std = cfg.data.normalization(cfg.model.in_channels)
    return images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)


# --------------------------------------------------------------------------- pure functions

def test_prefix_lengths_are_a_pure_uniform_function_of_seed_and_position():
    cfg = load_config(None, GRAY28)                    # 49 patches -> prefix in [1, 48]
    pos = np.arange(200_000)
    k = prefix_lengths(7, pos, cfg.model)
    assert k.dtype == torch.int64 and k.min() == 1 and k.max() == 48
    counts = torch.bincount(k, minlength=49)[1:].double()
    assert (counts / counts.mean() - 1).abs().max() < 0.05     # uniform: every value within 5%
    assert torch.equal(k[1234:1300], prefix_lengths(7, pos[1234:1300], cfg.model))
    assert torch.equal(k[:10], prefix_lengths(7, torch.arange(10), cfg.model))
    assert (k != prefix_lengths(8, pos, cfg.model)).float().mean() > 0.9
    cfg.model.prefix_min, cfg.model.prefix_max = 5, 9
    k = prefix_lengths(7, pos, cfg.model)
    assert sorted(torch.unique(k).tolist()) == [5, 6, 7, 8, 9]


def test_sample_positions_follow_split_microbatches(monkeypatch):
    """Micro-batch j of rank r holds exactly the samples split_microbatches gives rank r."""
    from aim_megatron.distributed import parallel
    cfg = load_config(None, ["train.micro_batch_size=2", "train.global_batch_size=12"])
    dp = 3
    for rank in range(dp):
        monkeypatch.setattr(parallel.parallel_state, "get_data_parallel_world_size", lambda: dp)
        monkeypatch.setattr(parallel.parallel_state, "get_data_parallel_rank", lambda r=rank: r)
        for step in range(2):
            glob = {"images": torch.arange(step * 12, step * 12 + 12)}
            split = parallel.split_microbatches(cfg, glob, world_size=dp)
            for i, mb in enumerate(split):
                ours = sample_positions(step * len(split) + i, rank, dp, 2, 12)
                assert mb["images"].tolist() == ours.tolist()
                assert torch.equal(microbatch_prefix_lengths(cfg, rank, dp, 2, step * len(split) + i),
                                   prefix_lengths(cfg.train.seed, mb["images"], cfg.model))
    with pytest.raises(ValueError, match="micro_batch_size"):
        sample_positions(0, 0, 3, 5, 12)


def test_mixing_weights_and_shard_bounds():
    which = assign_sources(3, np.arange(100_000), [0.8, 0.2])
    assert abs(which.mean() - 0.2) < 0.005
    which = assign_sources(3, np.arange(90_000), [1, 1, 1])
    assert np.abs(np.bincount(which) / 30_000 - 1).max() < 0.03
    bounds = [shard_bounds(23, r, 3) for r in range(3)]
    assert bounds == [(0, 7), (7, 15), (15, 23)]


def test_source_errors_name_problem_and_fix(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*make_shards"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="glob matched no files"):
        resolve_source(str(tmp_path / "*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar shards and no images"):
        resolve_source(str(tmp_path / "empty"))
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="must be a .tar"):
        resolve_source(str(tmp_path / "x.txt"))
    cfg = make_cfg(["synthetic", "synthetic"], "torch", 2, extra=["data.train_weights=[1.0]"])
    with pytest.raises(ValueError, match="one weight per source"):
        SyntheticLoader(cfg, 0, 1, 2)


def test_loader_selection_without_dali(monkeypatch, caplog, indexed):
    monkeypatch.setattr(data_mod, "dali_available", lambda: False)
    assert select_loader_kind("auto") == "torch"
    with pytest.raises(ImportError, match="DALI is not importable.*pip install nvidia-dali"):
        select_loader_kind("dali")
    caplog.set_level(logging.INFO, logger="aim_megatron.data")
    loader = build_loader(make_cfg([indexed[0]], "auto", 2, extra=["data.num_workers=0"]), 0, 1, 2)
    assert loader.kind == "torch"
    lines = [r.getMessage() for r in caplog.records if "data loader (train):" in r.getMessage()]
    assert len(lines) == 1 and "torch/PIL fallback" in lines[0] and "DALI is not importable" in lines[0]


def test_loader_selection_prefers_dali_when_importable(monkeypatch, caplog, indexed):
    if not data_mod.dali_available():
        pytest.skip("NVIDIA DALI is not importable")
    caplog.set_level(logging.INFO, logger="aim_megatron.data")
    loader = build_loader(make_cfg([indexed[0]], "auto", 2), 0, 1, 2)
    assert loader.kind == "dali"
    lines = [r.getMessage() for r in caplog.records if "data loader (train):" in r.getMessage()]
    assert len(lines) == 1 and "NVIDIA DALI" in lines[0] and "device_id=None" in lines[0]


# --------------------------------------------------------------------------- both loaders

def test_batch_contract_on_fashion_mnist_shards(kind, indexed):
    cfg = make_cfg([indexed[0]], kind, 5, dp=2, extra=GRAY28)
    loader = build_loader(cfg, 1, 2, 5)
    for j, batch in enumerate(take(loader, 3)):
        assert set(batch) == {"images", "prefix_len", "labels"}
        assert batch["images"].shape == (5, 1, 28, 28) and batch["images"].dtype == torch.float32
        assert batch["labels"].dtype == torch.int64 and batch["prefix_len"].dtype == torch.int64
        assert torch.equal(batch["prefix_len"], microbatch_prefix_lengths(cfg, 1, 2, 5, j))
        assert set(batch["labels"].tolist()) <= set(range(11, 23))      # rank 1 of 2 owns samples 11..22
        pixels = denormalize(batch["images"], cfg)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and pixels.std() > 0.1


def test_unlabelled_shards_give_label_minus_one(kind, tmp_path):
    images, _ = fashion_mnist("test")
    shards_from_arrays(images[:10], None, tmp_path, progress=False)
    batch = next(build_loader(make_cfg([tmp_path], kind, 4, extra=GRAY28), 0, 1, 4))
    assert batch["labels"].tolist() == [-1] * 4 and batch["images"].shape == (4, 1, 28, 28)


def test_real_jpegs_decode_in_rgb_and_gray(kind, real_folder):
    root, files = real_folder
    good = len(files["good"])
    for extra, channels in ((RGB32, 3), (GRAY28, 1)):
        cfg = make_cfg([root], kind, 4, extra=[*extra, "data.shuffle=false", "data.hflip=false"])
        loader = build_loader(cfg, 0, 1, 4)
        batches = take(loader, good // 4)                               # exactly one epoch of good files
        images = torch.cat([b["images"] for b in batches])
        labels = torch.cat([b["labels"] for b in batches])
        assert images.shape == (good, channels, cfg.model.image_size, cfg.model.image_size)
        # classes: 420 422 444 bad gray progressive; each good file exactly once, the bad class never.
        assert torch.bincount(labels, minlength=6).tolist() == [3, 3, 3, 0, 4, 3]
        assert loader.num_corrupt == 3                                  # truncated, text, empty
        pixels = denormalize(images, cfg)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        assert all(p.std() > 0.02 for p in pixels)                      # every crop holds a real picture
        if channels == 3:  # grayscale JPEGs come out with R == G == B
            gray = pixels[labels == 4]
            assert len(gray) == len(REAL_JPEGS["gray"])
            assert (gray[:, 0] - gray[:, 1]).abs().max() < 2 / 255 and (gray[:, 1] - gray[:, 2]).abs().max() < 2 / 255
        take(loader, good // 4)
        assert loader.num_corrupt == 6                                  # counted again in epoch 2
        loader.close()


def test_val_split_center_crops_in_stored_order(kind, real_folder):
    root, files = real_folder
    cfg = make_cfg(["synthetic"], kind, 16, extra=["model.image_size=112", "model.patch_size=14",
                                                   f"data.val_sources=[{root}]"])
    first = next(build_loader(cfg, 0, 1, 16, split="val"))
    again = next(build_loader(cfg, 0, 1, 16, split="val"))
    assert torch.equal(first["images"], again["images"])               # no random crop, flip or shuffle
    assert first["labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 4, 4, 4, 4, 5, 5, 5]   # stored order
    if kind == "dali":  # same center crop as the PIL path, up to resampling differences
        cfg.data.loader = "torch"
        reference = next(build_loader(cfg, 0, 1, 16, split="val"))
        diff = (denormalize(first["images"], cfg) - denormalize(reference["images"], cfg)).abs()
        assert diff.mean() < 0.03 and diff.mean(dim=(1, 2, 3)).max() < 0.07   # a flip: 0.2, BGR: 0.09
    with pytest.raises(ValueError, match="data.val_sources is empty"):
        build_loader(make_cfg(["synthetic"], kind, 4), 0, 1, 4, split="val")


def test_corrupt_samples_inside_a_shard_are_skipped_and_counted(kind, corrupt_shard, caplog):
    caplog.set_level(logging.WARNING, logger="aim_megatron.data")
    cfg = make_cfg([corrupt_shard], kind, 4, extra=[*RGB32, "data.shuffle=false"])
    loader = build_loader(cfg, 0, 1, 4)
    labels = torch.cat([b["labels"] for b in take(loader, 4)])
    assert sorted(labels.tolist()) == list(range(16)) and loader.num_corrupt == 3
    warned = [r.getMessage() for r in caplog.records if "skipped corrupt sample" in r.getMessage()]
    assert len(warned) == 3


def test_dp_shards_are_disjoint_and_complete_every_epoch(kind, indexed):
    n, dp, mbs, num_epochs = 23, 3, 4, 3
    epochs = [[] for _ in range(num_epochs)]
    for rank in range(dp):
        lo, hi = shard_bounds(n, rank, dp)
        size = hi - lo
        loader = build_loader(make_cfg([indexed[0]], kind, mbs, dp=dp, extra=GRAY28), rank, dp, mbs)
        labels = torch.cat([b["labels"] for b in take(loader, -(-num_epochs * size // mbs))]).tolist()
        blocks = [labels[e * size:(e + 1) * size] for e in range(num_epochs)]
        for e, block in enumerate(blocks):
            assert sorted(block) == list(range(lo, hi)), f"rank {rank} epoch {e}: {block}"
            epochs[e] += block
        assert blocks[0] != blocks[1] or blocks[1] != blocks[2]          # reshuffled between epochs
        loader.close()
    for e in range(num_epochs):
        assert sorted(epochs[e]) == list(range(n))                      # disjoint and complete


def test_weighted_mixing_of_two_sources(kind, indexed):
    cfg = make_cfg([indexed[0], indexed[1]], kind, 8, extra=[*GRAY28, "data.train_weights=[3, 1]"])
    loader = build_loader(cfg, 0, 1, 8)
    labels = torch.cat([b["labels"] for b in take(loader, 10)])
    expected = assign_sources(cfg.train.seed, np.arange(80), [3.0, 1.0])
    assert ((labels >= 1000).numpy() == (expected == 1)).all()          # per-position source as hashed
    assert 0.1 < (labels >= 1000).float().mean() < 0.4


@pytest.mark.parametrize("mixed", [False, True], ids=["one_source", "two_sources"])
def test_resume_is_bit_identical_across_epoch_boundary(kind, indexed, mixed):
    sources = [indexed[0], indexed[1]] if mixed else [indexed[0]]
    extra = [*GRAY28, "data.color_jitter=true", "data.num_workers=2"]
    if mixed:
        extra.append("data.train_weights=[0.6, 0.4]")
    cfg = make_cfg(sources, kind, 3, dp=2, extra=extra)
    k, more = 3, 6                       # rank 0 owns 11 of 23 samples (DALI pads 1): epoch 0 ends in batch 4
    reference = take(build_loader(cfg, 0, 2, 3), k + more)
    first = build_loader(cfg, 0, 2, 3)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(take(first, k), reference))
    state = json.loads(json.dumps(first.state_dict()))                  # plain JSON-able data
    if mixed:  # both streams stopped inside a chunk: the hard case
        assert [s["offset"] for s in state["streams"]] == [2, 1]
    first.close()
    resumed = build_loader(cfg, 0, 2, 3)
    resumed.load_state_dict(state)
    for ref, got in zip(reference[k:], take(resumed, more)):
        for key in ("images", "labels", "prefix_len"):
            assert torch.equal(ref[key], got[key]), key
    assert resumed.epochs[0] >= 1                                       # crossed an epoch boundary
    # A later state restores too (chained resume).
    state2 = resumed.state_dict()
    again = build_loader(cfg, 0, 2, 3)
    again.load_state_dict(state2)
    assert torch.equal(next(again)["images"], next(resumed)["images"])


def test_seek_without_state_follows_positions_with_a_fresh_order(kind, indexed):
    """What a trainer does when the DP layout changed: continue at micro-batch 40."""
    cfg = make_cfg([indexed[0]], kind, 4, dp=2, extra=GRAY28)
    start = torch.cat([b["labels"] for b in take(build_loader(cfg, 0, 2, 4), 3)])[:11].tolist()
    moved = build_loader(cfg, 0, 2, 4)
    moved.seek(40)
    batches = take(moved, 3)
    assert torch.equal(batches[0]["prefix_len"], microbatch_prefix_lengths(cfg, 0, 2, 4, 40))
    epoch = torch.cat([b["labels"] for b in batches])[:11].tolist()
    assert sorted(epoch) == sorted(start) == list(range(11)) and epoch != start
    resumed = build_loader(cfg, 0, 2, 4)                                 # exact resume after a seek
    resumed.load_state_dict(moved.state_dict())
    assert torch.equal(next(resumed)["images"], next(moved)["images"])


def test_resume_state_rejects_a_different_layout(kind, indexed):
    cfg = make_cfg([indexed[0]], kind, 3, dp=2, extra=GRAY28)
    state = build_loader(cfg, 0, 2, 3).state_dict()
    other = build_loader(make_cfg([indexed[0]], kind, 3, dp=1, extra=GRAY28), 0, 1, 3)
    with pytest.raises(ValueError, match="dp_size: saved 2, now 1"):
        other.load_state_dict(state)


# --------------------------------------------------------------------------- synthetic

def test_synthetic_loader_contract_and_resume():
    cfg = make_cfg(["synthetic"], "auto", 4, dp=2, extra=RGB32)
    loader = build_loader(cfg, 0, 2, 4)
    assert isinstance(loader, SyntheticLoader)
    batches = take(loader, 5)
    b = batches[0]
    assert b["images"].shape == (4, 3, 32, 32) and b["labels"].tolist() == [-1] * 4
    assert torch.equal(b["prefix_len"], microbatch_prefix_lengths(cfg, 0, 2, 4, 0))
    assert not torch.equal(batches[0]["images"], batches[1]["images"])
    pixels = denormalize(torch.cat([x["images"] for x in batches]), cfg)
    assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.std() > 0.1
    other_rank = next(build_loader(cfg, 1, 2, 4))
    assert not torch.equal(other_rank["images"], b["images"])
    cfg.data.val_sources = ["synthetic"]
    val = next(build_loader(cfg, 0, 2, 4, split="val"))
    assert val["images"].shape == b["images"].shape and not torch.equal(val["images"], b["images"])
    resumed = build_loader(cfg, 0, 2, 4)
    fresh = build_loader(cfg, 0, 2, 4)
    take(fresh, 2)
    resumed.load_state_dict(fresh.state_dict())
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(take(resumed, 3), batches[2:]))
