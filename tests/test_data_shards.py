"""Shard building (tools/make_shards.py) on real data: Fashion-MNIST and real JPEGs from Debian packages."""
import gzip
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from conftest import ROOT
from aim_megatron.data.local_datasets import fashion_mnist
from samples import make_real_jpeg_folder
from aim_megatron.data.shards import (decode_error, image_format, iter_tar_images, normalize_image_bytes,
                                      read_idx, read_wds_index, scan_tar, shards_from_arrays,
                                      shards_from_folder, verify_manifest, write_wds_index)


def test_fashion_mnist_idx_is_read_exactly():
    images, labels = fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10   # the test split is balanced
    assert 60 < images.mean() < 90                        # real clothing images, not blanks


def test_read_idx_rejects_truncated_file(tmp_path):
    src = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
    raw = gzip.open(src).read()
    cut = tmp_path / "cut.idx"
    cut.write_bytes(raw[:500])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(cut)
    with pytest.raises(FileNotFoundError, match="install_data.sh"):
        read_idx(tmp_path / "missing.gz")


def test_real_jpegs_cover_the_kinds_the_tests_claim(tmp_path):
    """Grayscale, progressive, 4:2:0, 4:2:2 and 4:4:4 baseline JPEGs are really there."""
    folder = make_real_jpeg_folder(tmp_path / "real")
    for path in folder["gray"]:
        assert Image.open(path).mode == "L"
    for path in folder["progressive"]:
        assert Image.open(path).info.get("progressive") == 1
    for kind, code in (("420", 2), ("422", 1), ("444", 0)):
        for path in folder[kind]:
            img = Image.open(path)
            assert img.mode == "RGB" and not img.info.get("progressive")
            assert JpegImagePlugin.get_sampling(img) == code, (path, kind)
    for path in folder["good"]:
        assert image_format(path.read_bytes()) == "jpeg" and decode_error(path.read_bytes()) is None
    for path in folder["bad"]:
        assert decode_error(path.read_bytes()) is not None


def test_folder_to_shards_skips_and_reports_bad_files(tmp_path):
    folder = make_real_jpeg_folder(tmp_path / "real")
    (tmp_path / "real" / "gray" / "notes.txt").write_text("a non-image file")
    out = tmp_path / "shards"
    manifest = shards_from_folder(tmp_path / "real", out, samples_per_shard=5, progress=False)
    good = len(folder["good"])
    assert manifest["num_samples"] == good == 16
    assert manifest["num_skipped"] == 4
    assert manifest["skipped_by_kind"] == {"truncated": 1, "not an image": 2, "empty": 1}
    assert manifest["num_shards"] == 4 and [s["num_samples"] for s in manifest["shards"]] == [5, 5, 5, 1]
    assert manifest["classes"] == ["420", "422", "444", "bad", "gray", "progressive"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert verify_manifest(out) == []

    labels, seen = [], 0
    for shard in manifest["shards"]:
        tar = out / shard["tar"]
        index = read_wds_index(out / shard["index"])
        assert [(s.key, s.components) for s in index] == [(s.key, s.components) for s in scan_tar(tar)]
        for sample, data, label in iter_tar_images(tar, index):
            assert decode_error(data) is None and image_format(data) == "jpeg"
            labels.append(label)
            seen += 1
    assert seen == good
    assert np.bincount(labels, minlength=6).tolist() == [3, 3, 3, 0, 4, 3]

    # A flipped byte in a shard is caught by the checksums.
    tar = out / manifest["shards"][1]["tar"]
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert verify_manifest(out) == [f"{tar}: sha256 mismatch"]


def test_arrays_to_shards_round_trip(tmp_path):
    images, labels = fashion_mnist("test")
    manifest = shards_from_arrays(images[:30], labels[:30], tmp_path, samples_per_shard=12,
                                  shuffle_seed=None, progress=False)
    assert manifest["num_samples"] == 30 and manifest["num_shards"] == 3
    got = []
    for shard in manifest["shards"]:
        for _, data, label in iter_tar_images(tmp_path / shard["tar"]):
            got.append((np.asarray(Image.open(io.BytesIO(data))), label))
    assert all(np.array_equal(a, images[i]) and lb == labels[i] for i, (a, lb) in enumerate(got))


def test_normalize_image_bytes_trims_junk_and_converts_formats(tmp_path):
    jpeg = (tmp_path / "x.jpg")
    Image.new("RGB", (40, 30), (10, 200, 30)).save(jpeg)
    data, ext = normalize_image_bytes(jpeg.read_bytes() + b"\x00junk")
    assert ext == "jpg" and data == jpeg.read_bytes()
    bmp = tmp_path / "x.bmp"
    Image.new("L", (40, 30), 77).save(bmp)
    data, ext = normalize_image_bytes(bmp.read_bytes())
    assert ext == "png" and image_format(data) == "png"
    assert np.asarray(Image.open(io.BytesIO(data))).max() == 77
    data, ext = normalize_image_bytes(jpeg.read_bytes(), max_side=20)
    assert Image.open(io.BytesIO(data)).size == (20, 15)


def test_wds_index_matches_what_the_tar_holds(tmp_path):
    tar_path = tmp_path / "t.tar"
    with tarfile.open(tar_path, "w") as tf:
        for name, data in (("a/000.jpg", b"xx"), ("a/000.cls", b"3"), ("a/001.png", b"yyyy"),
                           (".hidden.jpg", b"z")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    index = read_wds_index(write_wds_index(tar_path))
    assert [s.key for s in index] == ["a/000", "a/001"]
    raw = tar_path.read_bytes()
    off, size = index[0].components["cls"]
    assert raw[off:off + size] == b"3"
    off, size = index[1].components["png"]
    assert raw[off:off + size] == b"yyyy"


def test_make_shards_cli(tmp_path):
    make_real_jpeg_folder(tmp_path / "real")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "tools/make_shards.py", "--folder", str(tmp_path / "real"),
                           "--out", str(out), "--samples-per-shard", "8", "--quiet", "--workers", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 16 samples in 2 shard(s)" in proc.stdout and "skipped 3 file(s)" in proc.stdout
    proc = subprocess.run([sys.executable, "tools/make_shards.py", "--verify", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "OK" in proc.stdout
    proc = subprocess.run([sys.executable, "tools/make_shards.py", "--folder", str(tmp_path / "nope"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "does not exist" in proc.stderr

