"""Hang detection (aim_megatron/watchdog.py) on 2 gloo ranks: SIGSTOP one rank mid-run; the other
must notice within the timeout, dump its stacks, name the stuck rank and exit with the requeue
code, and torchrun must leave no process behind."""
import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, TINY

TIMEOUT_S = 8


def test_stopped_rank_is_detected_named_and_nothing_is_left(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               TORCH_ELASTIC_SHUTDOWN_TIMEOUT="2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "aim_megatron.train", *TINY, "model.in_channels=1", "train.micro_batch_size=2",
           "train.global_batch_size=8", "train.train_iters=100000", "train.log_interval=1",
           "train.tensorboard=false", "train.eval_interval=0", "train.save_interval=0",
           f"train.hang_timeout_s={TIMEOUT_S}",
           f"train.output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    beat = out / "heartbeat" / "rank1.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(beat.read_text())["step"] >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    pid = json.loads(beat.read_text())["pid"]
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S + 120)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.time() - stopped_at
    line = next((ln for ln in output.splitlines() if "hang detected" in ln), None)
    assert line, output[-4000:]
    assert "hang detected: rank 0 made no progress" in line and "stuck rank(s): 1;" in line
    assert "Current thread" in output or "Thread 0x" in output     # faulthandler's stack dump
    assert "File " in output.split("hang watchdog: no progress")[1]
    assert "exitcode  : 3" in output                                  # torchrun's report of rank 0
    assert proc.returncode != 0
    assert took < TIMEOUT_S + 90, took          # detected within the timeout (plus a loaded CPU)
    time.sleep(1)
    assert not os.path.exists(f"/proc/{pid}"), "the stopped rank was left behind"
