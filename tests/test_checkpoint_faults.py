"""Checkpoints under faults: background (async) saves train exactly like synchronous ones and publish
only complete checkpoints (kill -9 mid-write, a stop signal mid-write), a full disk and an
unwritable output directory fail in one line with exit 1, a damaged newest checkpoint falls back
to an older one, and train.save_interval=auto is the Young/Daly interval."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_training import BASE, losses, pretrain

WORKER = str(ROOT / "tests" / "checkpoint_fault_worker.py")


def worker(out: Path, overrides=(), worker_flags=(), resume="auto"):
    """checkpoint_fault_worker.py in a process group of its own (to kill it with its writers)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, WORKER, *worker_flags, "--resume", resume, *BASE,
           f"train.output_dir={out}", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for(predicate, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited {proc.returncode} early:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text()


def stalls(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "checkpoint_stalls.jsonl").read_text().splitlines()]


def test_async_save_trains_exactly_like_sync_on_two_ranks(tmp_path):
    run = ["train.train_iters=6", "train.save_interval=2", "train.keep_last=0", "train.eval_interval=0"]
    sync, background = tmp_path / "sync", tmp_path / "async"
    pretrain(sync, run + ["train.async_save=false"], nproc=2)
    pretrain(background, run + ["train.async_save=true"], nproc=2)
    assert losses(sync) == losses(background) and sorted(losses(sync)) == list(range(1, 7))
    for out in (sync, background):
        assert latest(out) == "step_00000006"
        assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == \
            ["step_00000002", "step_00000004", "step_00000006"]
        assert not list((out / "checkpoints").glob(".tmp_*"))
    # Interval saves write in the background when async; the final one completes before the exit.
    assert [s["background"] for s in stalls(background)] == [True, True, False]
    assert not any(s["background"] for s in stalls(sync))
    # Both resume to the same losses.
    pretrain(sync, ["train.train_iters=8", "train.async_save=false"], nproc=2)
    pretrain(background, ["train.train_iters=8"], nproc=2)
    assert losses(sync) == losses(background)


def test_kill_during_async_write_leaves_previous_latest(tmp_path):
    proc = worker(tmp_path, ["train.train_iters=1000", "train.save_interval=2", "train.keep_last=0"],
                  ["--write-delay", "3"])
    ckpts = tmp_path / "checkpoints"
    # step 2 is published when step 4's save starts; step 4's write is then under way.
    wait_for(lambda: (ckpts / "latest").exists() and (ckpts / ".tmp_step_00000004").exists(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert latest(tmp_path) == "step_00000002"
    assert not (ckpts / "step_00000004").exists()
    # The debris is not a checkpoint: a resume takes step 2, and its first save removes it.
    done = pretrain(tmp_path, ["train.train_iters=5", "train.save_interval=0"])
    assert "resumed from" in done.stderr and "step_00000002 at step 2" in done.stderr
    assert latest(tmp_path) == "step_00000005" and not list(ckpts.glob(".tmp_*"))


def test_stop_signal_during_async_write_completes_it_before_exit_3(tmp_path):
    proc = worker(tmp_path, ["train.train_iters=1000", "train.save_interval=2", "train.keep_last=0"],
                  ["--write-delay", "3"])
    ckpts = tmp_path / "checkpoints"
    wait_for(lambda: (ckpts / ".tmp_step_00000002").exists(), proc)
    os.killpg(proc.pid, signal.SIGTERM)  # as Slurm does: every process of the step, writers too
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out[-4000:]
    marker = json.loads((tmp_path / "requeue.json").read_text())
    stopped_at = marker["step"]
    assert (ckpts / "step_00000002" / "aim_meta.json").exists()
    assert latest(tmp_path) == f"step_{stopped_at:08d}"
    assert not list(ckpts.glob(".tmp_*"))
    resumed = pretrain(tmp_path, [f"train.train_iters={stopped_at + 1}"])
    assert f"at step {stopped_at}" in resumed.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs: room for one checkpoint of the model below, not two."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)])


# aim-tiny's widths: ~0.3M parameters, ~3.6 MB per checkpoint with Adam's moments.
SMALL_DISK_RUN = ["model.hidden_size=64", "model.num_heads=4", "model.head_hidden_size=64",
                  "model.head_ffn_hidden_size=256", "train.train_iters=4", "train.save_interval=2",
                  "train.keep_last=0", "train.eval_interval=0"]


def assert_disk_full_failure(returncode: int, output: str, out: Path, what: str) -> None:
    assert returncode == 1, output[-4000:]
    errors = [line for line in output.splitlines() if line.startswith("aim-pretrain:")]
    assert len(errors) == 1, output[-4000:]
    assert what in errors[0] and str(out / "checkpoints") in errors[0] and "MB" in errors[0], errors[0]
    assert "Traceback" not in output
    assert latest(out) == "step_00000002"
    assert (out / "checkpoints" / "step_00000002" / "aim_meta.json").exists()
    assert not list((out / "checkpoints").glob(".tmp_*"))


def test_disk_full_is_one_line_exit_1_and_keeps_latest(small_disk):
    out = small_disk / "run"
    proc = pretrain(out, SMALL_DISK_RUN, expect=1)
    assert_disk_full_failure(proc.returncode, proc.stderr, out, "no space for checkpoint step_00000004")


def test_disk_full_during_the_write_itself(small_disk):
    out = small_disk / "run"
    proc = worker(out, SMALL_DISK_RUN, ["--hide-disk-usage"])
    output, _ = proc.communicate(timeout=300)
    assert_disk_full_failure(proc.returncode, output, out, "disk full while writing checkpoint step_00000004")


def test_unwritable_output_dir_is_one_line_exit_1(tmp_path):
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode:
            pytest.skip("cannot mount a read-only tmpfs here")
    try:
        proc = pretrain(ro / "run", expect=1)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(ro)])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("aim-pretrain:")]
    assert len(lines) == 1 and "cannot be written" in lines[0] and str(ro / "run") in lines[0], proc.stderr
    assert "process group" not in proc.stderr and "Traceback" not in proc.stderr


def truncate_one_shard(step_dir: Path) -> str:
    shard = sorted(step_dir.glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard.name


def test_damaged_newest_checkpoint_falls_back_on_every_rank(tmp_path):
    # The distributed optimizer and the fully parallel load: each rank reads only part of the
    # files, so a damaged file is met by one rank; both must still fall back together.
    distopt = "parallel.use_distributed_optimizer=true"
    pretrain(tmp_path, ["train.train_iters=4", "train.save_interval=2", "train.keep_last=0",
                        "train.eval_interval=0", distopt], nproc=2)
    ckpts = tmp_path / "checkpoints"
    truncate_one_shard(ckpts / "step_00000004")
    resumed = pretrain(tmp_path, ["train.train_iters=6", "train.eval_interval=0", distopt], nproc=2)
    assert "fully parallel load of step_00000004" in resumed.stderr
    warning = [line for line in resumed.stderr.splitlines() if "skipped the newer damaged" in line]
    assert len(warning) == 1 and "step_00000004" in warning[0], resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "step_00000002 at step 2" in resumed.stderr
    assert latest(tmp_path) == "step_00000006"

    # Nothing readable: one line naming each skipped checkpoint, no embedded traceback.
    for step in ("step_00000002", "step_00000006"):
        truncate_one_shard(ckpts / step)
    (ckpts / "step_00000004").rename(ckpts / "gone")
    failed = pretrain(tmp_path, ["train.train_iters=8", distopt], nproc=2, expect=1)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("aim-pretrain:")]
    assert len(errors) == 1, failed.stderr[-4000:]
    assert "no readable checkpoint" in errors[0] and "step_00000006" in errors[0] \
        and "step_00000002" in errors[0], errors[0]
    # (torchrun adds its own ChildFailedError traceback after the line: its summary, not ours)
    assert "Traceback" not in errors[0] and "CheckpointException" not in failed.stderr
    assert len(errors[0]) < 2000


def test_save_interval_auto_is_young_daly():
    from aim_megatron.config import load_config
    from aim_megatron.scaling import checkpoint_interval as ci
    assert 50_600 < ci.LLAMA3_GPU_MTBF_HOURS < 50_700
    cfg = load_config(None, ["model.preset=aim-600M", "train.save_interval=auto"])
    # Llama 3's scale fails about every 3 hours, as the paper reports.
    assert 3.0 < ci.job_mtbf_s(cfg, 16384) / 3600 < 3.2
    plan = ci.plan_interval(cfg, 16384, step_s=2.0, measured_stall_s=5.0)
    expected_s = math.sqrt(2 * 5.0 * ci.LLAMA3_GPU_MTBF_HOURS * 3600 / 16384)
    assert plan.optimal_s == pytest.approx(expected_s)
    assert plan.interval_steps == plan.optimal_steps == round(expected_s / 2.0)
    assert plan.stall_measured and plan.lost_per_failure_s == pytest.approx(plan.optimal_steps)
    # Not measured: estimated from the checkpoint's bytes; a fixed interval is kept.
    fixed = load_config(None, ["model.preset=aim-600M", "train.save_interval=100"])
    est = ci.plan_interval(fixed, 64, step_s=1.0)
    assert not est.stall_measured and est.interval_steps == 100 and est.stall_s > 0
    assert est.optimal_s == pytest.approx(math.sqrt(2 * est.stall_s * ci.job_mtbf_s(fixed, 64)))


def test_save_interval_auto_in_a_run_uses_the_measured_stall(tmp_path):
    # An earlier segment measured 2 s per save and 0.5 s per step (8 images at 16 img/s).
    (tmp_path / "checkpoint_stalls.jsonl").write_text(json.dumps({"step": 2, "stall_s": 2.0}) + "\n")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "images_per_s": 16.0}) + "\n")
    proc = pretrain(tmp_path, ["train.train_iters=2", "train.save_interval=auto",
                               "train.gpu_mtbf_hours=0.01"])
    # sqrt(2 x 2 s x 36 s) = 12 s = 24 steps of 0.5 s.
    assert "save stall 2 s (measured)" in proc.stderr, proc.stderr[-3000:]
    assert "train.save_interval: every 24 steps" in proc.stderr
