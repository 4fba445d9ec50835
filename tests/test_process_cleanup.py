"""Nothing is left behind when a run dies hard (issue #15): torchrun puts every worker in a
session of its own, so neither a kill -9 of torchrun's process group nor the death of one rank
may leave trainer or helper processes running, and the surviving ranks must not hang."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT, TINY


def _start(out):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "aim_megatron.train", *TINY, "train.micro_batch_size=2",
           "train.global_batch_size=8", "train.train_iters=100000", "train.log_interval=1",
           "train.tensorboard=false", "train.save_interval=0", f"train.output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:  # training, not still starting up
        if metrics.exists() and metrics.read_text().count('"loss"') >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it was killed"
    family = psutil.Process(proc.pid).children(recursive=True)
    ranks = [p for p in family if "aim_megatron.train" in " ".join(p.cmdline())]
    assert len(ranks) == 2, [p.cmdline() for p in family]
    return proc, family, ranks


def _alive(procs):
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_all_gone(procs, seconds):
    deadline = time.time() + seconds
    while _alive(procs) and time.time() < deadline:
        time.sleep(0.2)
    left = _alive(procs)
    for p in left:  # never leave them to the rest of the suite
        p.kill()
    return left


@pytest.mark.parametrize("how", ["kill -9 of the process group", "kill -9 of one rank"])
def test_hard_kill_leaves_nothing_running(tmp_path, how):
    proc, family, ranks = _start(tmp_path / "run")
    if how == "kill -9 of the process group":
        os.killpg(proc.pid, signal.SIGKILL)     # torchrun's group; the workers are not in it
    else:
        ranks[-1].kill()                        # one rank dies; torchrun must end the other
    try:
        proc.wait(timeout=120)                  # torchrun gone: no hang on the dead rank
    finally:
        if proc.poll() is None:
            proc.kill()
    left = _wait_all_gone(family, 30)
    assert not left, f"left running after {how}: {[(p.pid, p.cmdline()[:4]) for p in left]}"
