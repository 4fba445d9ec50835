"""Hang detection (aim_megatron/training/watchdog.py) on 2 gloo ranks under torchrun: (1) SIGSTOP one rank
mid-run: the other must notice within the timeout, dump its stacks, name the stuck rank and exit
with the requeue code, and torchrun must leave no process behind; (2) one rank sleeps before a step
(injected by tests/hang_worker.py) while the other waits inside that step's collective: both must dump their stacks,
name the sleeping rank and exit 3. The same under a real Slurm job: tests/test_slurm_real.py."""
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


def test_rank_blocked_outside_a_collective_is_named_and_every_rank_dumps_and_exits(tmp_path):
    """Rank 1 sleeps forever before step 4 (tests/hang_worker.py wraps Trainer.train_step)
    while rank 0 goes into step 4 and waits inside its first gloo collective (a C++ call). Rank 0's
    watchdog thread must keep running (its heartbeat stays fresh: the call releases the GIL), both
    ranks must dump their stacks, name rank 1 (not in a collective, while rank 0 is) and exit 3,
    and the requeue marker must be written."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               TORCH_ELASTIC_SHUTDOWN_TIMEOUT="2",
               AIM_REQUEUE_MARKER=str(tmp_path / "requeue.json"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "hang_worker.py"), "1:3", *TINY, "model.in_channels=1",
           "train.micro_batch_size=2",
           "train.global_batch_size=8", "train.train_iters=100000", "train.log_interval=1",
           "train.tensorboard=false", "train.eval_interval=0", "train.save_interval=0",
           f"train.hang_timeout_s={TIMEOUT_S}", f"train.output_dir={out}"]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    beats = {k: out / "heartbeat" / f"rank{k}.json" for k in (0, 1)}
    seen_waiting = []   # rank 0's heartbeat while it waits: (alive, in_collective, where)
    try:
        while proc.poll() is None and time.time() - start < 300:
            try:
                r0, r1 = (json.loads(beats[k].read_text()) for k in (0, 1))
            except (OSError, ValueError):
                time.sleep(0.2)
                continue
            if r1["step"] == 3 and r0["step"] == 3 and not r0.get("fired"):
                seen_waiting.append((r0["alive"], r0["in_collective"], r0["where"], r1["in_collective"]))
            time.sleep(0.5)
        output, _ = proc.communicate(timeout=TIMEOUT_S + 120)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [ln for ln in output.splitlines() if "hang detected" in ln]
    assert any("hang detected: rank 0 made no progress" in ln for ln in lines), output[-5000:]
    assert any("hang detected: rank 1 made no progress" in ln for ln in lines), output[-5000:]
    assert all("stuck rank(s): 1;" in ln for ln in lines), lines
    # both ranks dumped their stacks; rank 0's main thread is inside torch.distributed
    assert output.count("stack of every thread follows") == 2, output[-5000:]
    dump0 = output.split("[rank 0] hang watchdog: no progress")[1]
    assert "torch/distributed/" in dump0.split("hang detected")[0], dump0[:4000]
    assert "block_forever" in output               # rank 1's stack shows where it sleeps
    assert "exitcode  : 3" in output
    assert proc.returncode != 0
    marker = json.loads((tmp_path / "requeue.json").read_text())
    assert marker["signal"] == "hang" and marker["stuck_ranks"] == [1] and marker["step"] == 3
    # the watchdog thread of the rank inside the C++ collective kept running
    assert seen_waiting and all(c for _, c, _, _ in seen_waiting[-3:]), seen_waiting[-5:]
    assert not any(c1 for _, _, _, c1 in seen_waiting), seen_waiting[-5:]
    alive = [a for a, _, _, _ in seen_waiting]
    assert max(alive) - min(alive) >= TIMEOUT_S / 2, alive   # it kept beating while blocked
