#!/usr/bin/env python
"""Images/s of the DALI loader vs the torch/PIL fallback, in the same run, on the same shards.

    python benchmarks/data_throughput.py                       # real JPEG photos from the Debian packages
    python benchmarks/data_throughput.py --source shards/in1k --batch 128 --workers 8

Both loaders run the training path (and every batch is read once, like a copy to the GPU): decode, RandomResizedCrop(224, 0.4-1.0, bicubic), horizontal flip,
normalize to float CHW (``--color-jitter`` adds ColorJitter), micro-batch ``--batch``, ``--workers``
threads/processes. By default the photos of scripts/install_data.sh are re-encoded once to at most
``--max-side`` pixels (ImageNet-like sizes) into shards under ``--data-dir``. DALI runs on the GPU
("mixed" decode) when CUDA is available, and on the CPU in any case.
Also prints the images/s per GPU that aim-600M needs at 45% MFU on an H100.

``--profile`` instead times each stage on its own, for both CPU loaders: DALI pipelines cut after
each stage (read; + full decode; the decode of the random crop only; + bicubic resize; + flip and
normalize) at ``--workers`` threads, then the trainer's DALI loader; PIL one image at a time in this
process (decode, crop + resize, to tensor), then the trainer's DataLoader. Each row gives images per
wall-second and per CPU-second and the CPU milliseconds per image the stage adds.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aim_megatron.config import load_config
from aim_megatron.data import dali_available

# aim-600M pre-training (FACTS section 1): the trainer's own FLOP count (aim_megatron/scaling/flops.py).
H100_BF16_PEAK = 989e12
MFU = 0.45


def flops_per_image() -> tuple[float, str]:
    from aim_megatron.config import load_config
    from aim_megatron.scaling.flops import train_flops_per_image
    model = load_config(None, ["model.preset=aim-600M"]).model
    flops = train_flops_per_image(model)
    text = ("FLOPs/image = 3 x forward matmul FLOPs of trunk + 0.41B head, attention counted over the\n"
            f"              pairs the prefix-causal mask allows (aim_megatron/scaling/flops.py) = {flops:.4g}")
    return flops, text


def build_bench_shards(data_dir: Path, max_side: int, copies: int) -> tuple[Path, str]:
    """The Debian photos re-encoded once to ``max_side``, written ``copies`` times (a bigger epoch keeps
    DALI's end-of-epoch padding, at most one batch per epoch, from skewing the numbers)."""
    from aim_megatron.data.local_datasets import real_photo_files
    from aim_megatron.data.shards import ShardWriter, iter_tar_images, shards_from_folder

    base = data_dir / f"photos_max{max_side}"
    if not (base / "manifest.json").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            for i, path in enumerate(real_photo_files()):  # flat folder of links: no class labels
                os.symlink(path, Path(tmp) / f"{i:04d}{path.suffix.lower()}")
            shards_from_folder(tmp, base, samples_per_shard=64, max_side=max_side,
                               workers=os.cpu_count() or 1, progress=True)
    manifest = json.loads((base / "manifest.json").read_text())
    out = data_dir / f"photos_max{max_side}_x{copies}"
    if not (out / "manifest.json").is_file():
        samples = [data for s in manifest["shards"] for _, data, _ in iter_tar_images(base / s["tar"])]
        with ShardWriter(out, samples_per_shard=256) as writer:
            for _ in range(copies):
                for data in samples:
                    writer.write(data, "jpg")
            shards = writer.close()
        (out / "manifest.json").write_text(json.dumps({"shards": shards, "classes": []}))
    return out, f"{copies} x {manifest['num_samples']} real photos re-encoded to <= {max_side} px"


def cpu_seconds() -> float:
    """CPU time of this process (all threads, e.g. DALI's) plus its live children (DataLoader workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def measure(kind: str, source: str, args, dali_device: str = "cpu") -> dict:
    """Build a loader, drain its prefetch queue (warm-up), then time steady-state batches."""
    from aim_megatron.data import build_loader

    cfg = load_config(None, [
        f"data.train_sources=[{source}]", f"data.loader={kind}", f"data.num_workers={args.workers}",
        f"data.dali_device={dali_device}", f"data.color_jitter={str(args.color_jitter).lower()}",
        f"model.image_size={args.image_size}", "model.patch_size=14", "model.in_channels=3",
        f"train.micro_batch_size={args.batch}", f"train.global_batch_size={args.batch}"])
    loader = build_loader(cfg, 0, 1, args.batch)
    for _ in range(args.warmup):
        batch = next(loader)
    sync = torch.cuda.synchronize if batch["images"].is_cuda else (lambda: None)
    sync()
    start, cpu_start = time.perf_counter(), cpu_seconds()
    checksum = 0.0
    for _ in range(args.batches):
        batch = next(loader)
        # Read every value, as the trainer's copy to the GPU does; shared-memory batches from
        # DataLoader workers only fault their pages in when read.
        checksum += float(batch["images"].sum())
    sync()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    assert batch["images"].shape == (args.batch, 3, args.image_size, args.image_size) and checksum == checksum
    loader.close()
    del loader
    images = args.batches * args.batch
    return {"seconds": seconds, "images_per_s": images / seconds, "images_per_cpu_s": images / cpu,
            "device": "cuda" if batch["images"].is_cuda else "cpu"}


def dali_stage(tars: list[str], indices: list[str], stage: str, batch: int, threads: int, size: int):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, seed=0, prefetch_queue_depth=2)
    def pipe():
        raw = fn.readers.webdataset(paths=tars, index_paths=indices, ext=["jpg"], random_shuffle=True,
                                    initial_fill=256, name="reader")
        if stage == "read":
            return raw
        if stage == "decode":
            return fn.decoders.image(raw, device="cpu", output_type=types.RGB)
        images = fn.decoders.image_random_crop(raw, device="cpu", output_type=types.RGB,
                                               random_area=[0.4, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                               num_attempts=10)
        if stage == "crop decode":
            return images
        interp = types.INTERP_LINEAR if stage.endswith("(linear)") else types.INTERP_CUBIC
        images = fn.resize(images, size=[size, size], interp_type=interp, antialias=True)
        if stage == "resize":
            return images
        return fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(probability=0.5), dtype=types.FLOAT,
                                        output_layout="CHW", mean=[0.0] * 3, std=[255.0] * 3)
    p = pipe()
    p.build()
    return p


def time_dali(pipe, batches: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        pipe.run()
    start, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        out = pipe.run()[0]
        if out.is_dense_tensor():  # the decoded stages: one view of the batch, as the loader takes
            out.as_tensor()
    return time.perf_counter() - start, cpu_seconds() - cpu


def pil_stages(samples: list[bytes], size: int, n: int) -> list[tuple[str, float]]:
    """CPU seconds per image of each PIL stage, one image at a time in this process."""
    from PIL import Image

    from aim_megatron.data.pil import random_resized_crop_box

    rng = np.random.default_rng(0)
    picks = [samples[i % len(samples)] for i in range(n)]
    t0 = time.process_time()
    decoded = []
    for data in picks:
        img = Image.open(io.BytesIO(data))
        img.load()
        decoded.append(img.convert("RGB"))
    t1 = time.process_time()
    resized = []
    for img in decoded:
        left, top, w, h = random_resized_crop_box(img.width, img.height, (0.4, 1.0), rng)
        resized.append(img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)))
    t2 = time.process_time()
    for img in resized:
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32))
        (arr / 255.0).permute(2, 0, 1).contiguous()
    t3 = time.process_time()
    return [("decode", (t1 - t0) / n), ("crop + bicubic resize", (t2 - t1) / n), ("to normalized tensor", (t3 - t2) / n)]


PROFILE_REF = {"decode": "read", "crop decode": "read", "resize": "crop decode",
               "resize (linear)": "crop decode", "normalize": "resize"}
PROFILE_LABEL = {"read": "read (webdataset)", "decode": "+ full decode",
                 "crop decode": "read + decode of the crop only", "resize": "+ resize bicubic (antialias)",
                 "resize (linear)": "  (same, bilinear instead)", "normalize": "+ flip, normalize"}


def profile(path: Path, args) -> None:
    """--profile: the stages of both CPU loaders, each timed on its own (see the module text)."""
    from aim_megatron.data.shards import iter_tar_images
    from aim_megatron.data.sources import resolve_source

    source = resolve_source(str(path))
    images = args.batch * args.batches
    print(f"{'loader':<6} {'threads':>7}  {'stage (cumulative)':<34} {'images/s':>9} {'images/CPU-s':>13} "
          f"{'CPU ms/image':>13} {'added':>7}")
    row = "{:<6} {:>7}  {:<34} {:>9.1f} {:>13.1f} {:>13.2f} {:>+7.2f}"
    threads = args.workers
    ms = {}
    for stage in PROFILE_LABEL:
        pipe = dali_stage(source.tars, source.indices, stage, args.batch, threads, args.image_size)
        wall, cpu = time_dali(pipe, args.batches, args.warmup)
        del pipe
        ms[stage] = 1e3 * cpu / images
        added = ms[stage] - ms.get(PROFILE_REF.get(stage), 0.0)
        print(row.format("dali", threads, PROFILE_LABEL[stage], images / wall, images / cpu, ms[stage], added),
              flush=True)
    r = measure("dali", str(path), args, "cpu")
    total = 1e3 / r["images_per_cpu_s"]
    print(row.format("dali", threads, "the trainer's loader (+ checks)", r["images_per_s"], r["images_per_cpu_s"],
                     total, total - ms["normalize"]), flush=True)
    samples = [data for tar in source.tars for _, data, _ in iter_tar_images(tar)]
    total = 0.0
    for label, seconds in pil_stages(samples, args.image_size, min(len(samples), 300)):
        total += seconds
        print(row.format("pil", 1, ("+ " if label != "decode" else "read + ") + label, 1 / total, 1 / total,
                         1e3 * total, 1e3 * seconds))
    r = measure("torch", str(path), args)
    total = 1e3 / r["images_per_cpu_s"]
    print(row.format("pil", threads, "the trainer's loader (DataLoader)", r["images_per_s"], r["images_per_cpu_s"],
                     total, 0.0), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="shards or image folder (default: real photos, built once)")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "aim_megatron_bench"))
    p.add_argument("--max-side", type=int, default=500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=15, help="timed micro-batches per loader and round")
    p.add_argument("--warmup", type=int, default=10, help="untimed batches; > the prefetch depth")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--copies", type=int, default=8, help="copies of the photo set in the default shards")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--color-jitter", action="store_true")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--profile", action="store_true",
                   help="instead: each stage of the DALI CPU pipeline and of the PIL path timed on its own")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.source:
        source, described = args.source, args.source
    else:
        path, described = build_bench_shards(Path(args.data_dir), args.max_side, args.copies)
        source = str(path)
    if args.profile:
        if not dali_available():
            sys.exit("--profile needs NVIDIA DALI")
        print(f"source: {described}; {os.cpu_count()} CPU cores; batch {args.batch}; {args.batches} timed batches "
              f"after {args.warmup} warm-up; RandomResizedCrop {args.image_size} (0.4-1.0), flip, normalize\n")
        profile(Path(source), args)
        return 0
    variants = [("torch", "torch", "cpu")]
    if dali_available():
        variants.append(("dali-cpu", "dali", "cpu"))
        if torch.cuda.is_available():
            variants.append(("dali-gpu", "dali", "gpu"))
    else:
        print("NVIDIA DALI is not importable: only the fallback is measured (pip install nvidia-dali-cuda130==2.4.0)")
    # Rounds alternate the loaders (one alive at a time) so background load hits them alike.
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for r in range(args.rounds):
        for name, kind, device in variants:
            runs[name].append(measure(kind, source, args, device))
            last = runs[name][-1]
            print(f"round {r + 1}/{args.rounds} {name:<9} {last['images_per_s']:7.1f} images/s "
                  f"{last['images_per_cpu_s']:7.1f} images/CPU-s", flush=True)
    rows = []
    for name, _, _ in variants:
        wall = sorted(x["images_per_s"] for x in runs[name])
        cpu = sorted(x["images_per_cpu_s"] for x in runs[name])
        rows.append({"loader": name, "device": runs[name][0]["device"], "workers": args.workers,
                     "images": args.batches * args.batch, "wall_rounds": wall, "cpu_rounds": cpu,
                     "images_per_s": wall[len(wall) // 2], "images_per_cpu_s": cpu[len(cpu) // 2]})
    base, base_cpu = rows[0]["images_per_s"], rows[0]["images_per_cpu_s"]
    print(f"\nsource: {described}; {os.cpu_count()} CPU cores; batch {args.batch}; {args.batches} timed batches "
          f"after {args.warmup} warm-up; medians of {args.rounds} rounds; RandomResizedCrop {args.image_size} "
          f"bicubic + flip{' + color jitter' if args.color_jitter else ''} + normalize")
    print("images/CPU-s counts the CPU time of the process, its threads and its worker processes: it stays "
          "meaningful when other jobs share the cores, wall-clock images/s does not.")
    print(f"{'loader':<9} {'device':<6} {'workers':>7} {'images/s':>9} {'ratio':>6} {'images/CPU-s':>13} "
          f"{'ratio':>6}   rounds (images/s | images/CPU-s)")
    for r in rows:
        r["ratio"], r["cpu_ratio"] = r["images_per_s"] / base, r["images_per_cpu_s"] / base_cpu
        detail = " ".join(f"{x:.0f}" for x in r["wall_rounds"]) + " | " + " ".join(f"{x:.0f}" for x in r["cpu_rounds"])
        print(f"{r['loader']:<9} {r['device']:<6} {r['workers']:>7} {r['images_per_s']:>9.1f} {r['ratio']:>5.2f}x "
              f"{r['images_per_cpu_s']:>13.1f} {r['cpu_ratio']:>5.2f}x   {detail}")

    flops, formula = flops_per_image()
    need = MFU * H100_BF16_PEAK / flops
    print(f"\nTo feed aim-600M at {MFU:.0%} MFU on one H100 ({H100_BF16_PEAK / 1e12:.0f} TFLOP/s bf16 peak):")
    print(formula)
    print(f"images/s per GPU = {MFU} * {H100_BF16_PEAK:.3g} / {flops:.4g} = {need:.0f}")
    for r in rows:
        if r["device"] == "cpu":
            print(f"  {r['loader']}: {r['images_per_cpu_s']:.0f} images per CPU-second -> ~{need / r['images_per_cpu_s']:.1f} "
                  f"CPU cores per GPU")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "flops_per_image": flops,
                                               "needed_images_per_s_per_gpu": need}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
