"""The training loop end to end: loss goes down, resume is bit-exact (also with the distributed
optimizer and after SIGTERM), NaN steps are skipped and stop the run, checkpoints are atomic,
and bad checkpoints/configs fail clearly without touching what is on disk."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY

BASE = TINY + ["model.in_channels=1", "train.micro_batch_size=2", "train.global_batch_size=8",
               "train.lr=2e-3", "train.scale_lr=false", "train.log_interval=1",
               "train.tensorboard=false", "train.eval_iters=2"]


def pretrain(out: Path, overrides=(), nproc=1, expect=0, resume="auto", wait=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    args = ["--resume", resume, *BASE, f"train.output_dir={out}", *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "aim_megatron.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "aim_megatron.train", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, f"exit {proc.returncode}, wanted {expect}:\n{proc.stderr[-6000:]}"
    return proc


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def val_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records if "val_loss" in r]


def test_loss_goes_down(tmp_path):
    pretrain(tmp_path, ["train.train_iters=40", "train.eval_interval=20", "train.lr=3e-3"])
    curve = losses(tmp_path)
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(36, 41)) / 5
    assert last < first - 0.02, (first, last)
    vals = val_losses(tmp_path)
    assert len(vals) == 2 and vals[-1] < vals[0]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000040"


@pytest.mark.parametrize("nproc,layout", [(1, []), (2, ["parallel.use_distributed_optimizer=true"])])
def test_resume_is_bit_exact(tmp_path, nproc, layout):
    full, split = tmp_path / "full", tmp_path / "split"
    run = ["train.train_iters=8", *layout]
    pretrain(full, run, nproc)
    pretrain(split, run + ["train.exit_after_steps=4"], nproc)
    assert max(losses(split)) == 4
    pretrain(split, run, nproc)
    a, b = losses(full), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}


def test_sigterm_checkpoints_and_resumes_exactly(tmp_path):
    full, preempted = tmp_path / "full", tmp_path / "preempted"
    run = ["train.train_iters=30"]
    pretrain(full, run)
    proc = pretrain(preempted, run, wait=False)
    metrics = preempted / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out[-3000:]
    stopped_at = max(losses(preempted))
    assert stopped_at < 30, "the signal arrived after the run had finished; nothing was tested"
    assert (preempted / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
    pretrain(preempted, run)
    a, b = losses(full), losses(preempted)
    assert all(a[s] == b[s] for s in a)


def test_bad_checkpoints_and_mismatched_configs_fail_clearly(tmp_path):
    pretrain(tmp_path, ["train.train_iters=2"])
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    snapshot = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}

    # Another model size: refused, and the message names the differing field.
    proc = pretrain(tmp_path, ["train.train_iters=4", "model.hidden_size=64"], expect=1)
    assert "model.hidden_size: checkpoint 32, config 64" in proc.stderr
    # Another global batch: the data position would be wrong.
    proc = pretrain(tmp_path, ["train.train_iters=4", "train.global_batch_size=16"], expect=1)
    assert "train.global_batch_size" in proc.stderr
    # A checkpoint path that does not exist.
    proc = pretrain(tmp_path, ["train.train_iters=4"], resume=str(tmp_path / "nope"), expect=1)
    assert "does not exist" in proc.stderr
    # Nothing was overwritten by the failed attempts.
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == snapshot
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002"

    # A damaged checkpoint: metadata gone.
    (ckpt / "metadata.json").unlink()
    proc = pretrain(tmp_path, ["train.train_iters=4"], expect=1)
    assert "not a complete aim-megatron checkpoint" in proc.stderr
    # A damaged checkpoint: a data file truncated.
    pretrain(tmp_path / "b", ["train.train_iters=2"])
    ckpt_b = tmp_path / "b" / "checkpoints" / "step_00000002"
    for f in ckpt_b.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    proc = pretrain(tmp_path / "b", ["train.train_iters=4"], expect=1)
    assert "could not read checkpoint" in proc.stderr
    # A `latest` pointing nowhere.
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step_00000099")
    proc = pretrain(tmp_path / "b", ["train.train_iters=4"], expect=1)
    assert "does not exist" in proc.stderr


def test_bad_layout_fails_at_start(tmp_path):
    proc = pretrain(tmp_path, ["parallel.tp=3"], expect=1)
    assert "not divisible by parallel.tp=3" in proc.stderr
