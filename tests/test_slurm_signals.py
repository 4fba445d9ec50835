"""The trainer's side of Slurm requeue: a stop signal is never lost (one during resume is acted on
before the first step), a repeated SIGTERM during the signal-time save does not cut the save, and
every signalled exit leaves the requeue marker the sbatch scripts read."""
import json
import os
import subprocess
import sys

from conftest import ROOT, TINY

BASE = TINY + ["model.in_channels=1", "train.micro_batch_size=2", "train.global_batch_size=8",
               "train.log_interval=1", "train.tensorboard=false", "train.eval_iters=1",
               "train.train_iters=6"]

# Runs aim-pretrain in-process with signals sent from inside at exact points: SIGTERM x3 while
# the trainer's checkpoint saver writes (the first before the write), or SIGTERM during
# checkpoint.load.
DRIVER = """
import os, signal, sys, time
from aim_megatron.checkpoint import checkpointer as checkpoint
from aim_megatron.training import main as pretrain
from aim_megatron.training.checkpointing import CheckpointSaver
from aim_megatron.training.trainer import Trainer
mode, args = sys.argv[1], sys.argv[2:]
real_save, real_load, real_step = CheckpointSaver.save, checkpoint.load, Trainer.train_step

def save(self, step, *a, **k):
    if mode == "during-save":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        real_save(self, step, *a, **k)
        path = self.root / checkpoint.step_dir_name(step)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        open(os.environ["SAVE_DONE"], "a").write(str(path) + "\\n")
        return
    return real_save(self, step, *a, **k)

def load(*a, **k):
    if mode == "during-resume":
        os.kill(os.getpid(), signal.SIGTERM)
    return real_load(*a, **k)

def step(self):
    out = real_step(self)
    if mode == "during-save" and self.step == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return out

CheckpointSaver.save, checkpoint.load, Trainer.train_step = save, load, step
sys.exit(pretrain.main(args))
"""


def run(mode, out, *extra, expect):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               SAVE_DONE=str(out.parent / f"{out.name}.saves"))
    proc = subprocess.run([sys.executable, "-c", DRIVER, mode, *BASE, f"train.output_dir={out}", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, f"exit {proc.returncode}, wanted {expect}:\n{proc.stderr[-4000:]}"
    return proc


def steps(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def test_repeated_sigterm_during_signal_save_does_not_cut_it(tmp_path):
    out = tmp_path / "run"
    run("during-save", out, expect=3)
    # One save, at the signalled step, finished in full though two more SIGTERMs came during it.
    assert (tmp_path / "run.saves").read_text().splitlines() == [str(out / "checkpoints" / "step_00000003")]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
    assert json.loads((out / "requeue.json").read_text())["step"] == 3
    assert steps(out) == [1, 2, 3]
    run("none", out, expect=0)          # resumes from it and finishes
    assert steps(out) == [1, 2, 3, 4, 5, 6]


def test_signal_during_resume_checkpoints_before_any_step(tmp_path):
    out = tmp_path / "run"
    run("none", out, "train.exit_after_steps=2", expect=0)
    assert steps(out) == [1, 2]
    marker = tmp_path / "marker.json"
    env_marker = {"AIM_REQUEUE_MARKER": str(marker)}
    os.environ.update(env_marker)
    try:
        proc = run("during-resume", out, expect=3)
    finally:
        os.environ.pop("AIM_REQUEUE_MARKER")
    assert "checkpointing at step 2 and exiting for requeue" in proc.stderr
    assert steps(out) == [1, 2]                    # no step ran, none was lost
    assert json.loads(marker.read_text())["step"] == 2
    assert not (out / "requeue.json").exists()
    assert not (tmp_path / "run.saves").exists()  # the step-2 checkpoint it resumed from is kept


def test_stop_file_is_a_time_limit_request(tmp_path):
    """lib.sh creates AIM_STOP_FILE on the batch shell's SIGUSR1; the trainer consumes it."""
    out, stop = tmp_path / "run", tmp_path / "stop"
    stop.touch()
    os.environ["AIM_STOP_FILE"] = str(stop)
    try:
        proc = run("none", out, expect=3)
    finally:
        os.environ.pop("AIM_STOP_FILE")
    assert "signal 10 received: checkpointing at step 0" in proc.stderr
    assert not stop.exists() and json.loads((out / "requeue.json").read_text())["step"] == 0
    # step 0 of a fresh run: no checkpoint (its empty optimizer state would not load); the
    # requeued run starts from scratch, losing nothing
    assert not list((out / "checkpoints").glob("step_*"))


def test_checkpoint_writer_survives_the_steps_sigterm():
    """Slurm signals every process of a job step: megatron's checkpoint-writer Manager used to die
    of the preemption SIGTERM, and the signal-time save with it (EOFError)."""
    code = """
import os, signal, time
from aim_megatron.training import preemption
from megatron.core.dist_checkpointing.strategies import filesystem_async
preemption.signal_proof_checkpoint_writer()
process = preemption.checkpoint_writer_managers[0]._process
os.kill(process.pid, signal.SIGTERM)
os.kill(process.pid, signal.SIGUSR1)
time.sleep(0.5)
filesystem_async._results_queue.put("written")
print(process.is_alive(), filesystem_async._results_queue.get())
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.stdout.split() == ["True", "written"], r.stderr[-3000:]
