"""One writer per run directory (issue #28): the writer lock of train.output_dir.

Unit tests of the lock (exclusive creation, what makes a holder stale, a race of takers, a holder
that lost its lock) and trainers on one directory: a second one refused while the first runs, a
kill -9'd holder taken over after train.lock_timeout_s, a requeued Slurm job taking over its own
lock at once."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest

from aim_megatron.training import run_lock
from aim_megatron.training.run_lock import LOCK_NAME, RunDirectoryInUse, RunLock, _remove_if_token, this_process
from conftest import ROOT

TINY_CONFIG = str(ROOT / "examples" / "configs" / "aim_tiny_synthetic.yaml")


def plant(out, age_s=0.0, heartbeat_age_s=None, **fields):
    """A lock left by some other process: its record, and its heartbeat ``heartbeat_age_s`` old
    (none when None)."""
    out.mkdir(parents=True, exist_ok=True)
    record = {**this_process(), "pid": 1, "pid_start": None, "job": None,
              "token": uuid.uuid4().hex, "started": time.time() - age_s, **fields}
    (out / LOCK_NAME).write_text(json.dumps(record))
    if heartbeat_age_s is not None:
        (out / (LOCK_NAME + ".heartbeat")).write_text(
            json.dumps({"token": record["token"], "time": time.time() - heartbeat_age_s}))
    return record


def held_token(out):
    return json.loads((out / LOCK_NAME).read_text())["token"]


def other_host(**fields):
    return {**this_process(), "host": "node-b", "pid": 4321, "job": None, **fields}


def test_the_first_writer_holds_and_a_second_is_refused_with_one_line(tmp_path):
    out = tmp_path / "run"
    first = RunLock(out, timeout_s=300, identity={**this_process(), "job": "123"}).acquire()
    try:
        assert held_token(out) == first.record["token"]
        heartbeat = json.loads((out / (LOCK_NAME + ".heartbeat")).read_text())
        assert heartbeat["token"] == first.record["token"]
        with pytest.raises(RunDirectoryInUse) as refused:
            RunLock(out, timeout_s=300, identity=other_host(job="777")).acquire()
        message = str(refused.value)
        assert "\n" not in message
        for part in (f"run directory {out} is in use", f"host {this_process()['host']}",
                     f"pid {os.getpid()}", "Slurm job 123", "heartbeat 0 s ago", "scancel 123",
                     "another train.output_dir", f"remove {out / LOCK_NAME}"):
            assert part in message, (part, message)
        assert held_token(out) == first.record["token"]  # the refused one changed nothing
    finally:
        first.release()
    assert not out.exists(), "a directory the lock alone created is removed with it"


def test_release_leaves_a_used_directory_and_a_later_writer_takes_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock(out, timeout_s=300).acquire()
    (out / "metrics.jsonl").write_text("{}\n")
    lock.release()
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
    again = RunLock(out, timeout_s=300).acquire()
    assert again.took_over is None
    again.release()


def test_a_holder_whose_process_ended_on_this_host_is_taken_over_at_once(tmp_path):
    out = tmp_path / "run"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    plant(out, heartbeat_age_s=0, pid=ended.pid)
    lock = RunLock(out, timeout_s=300).acquire()
    assert f"process {ended.pid} on this host has ended" in lock.took_over
    lock.release()


def test_a_killed_holder_not_yet_reaped_counts_as_ended(tmp_path):
    out = tmp_path / "run"
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        plant(out, heartbeat_age_s=0, pid=zombie.pid, pid_start=run_lock._process_start(zombie.pid))
        with pytest.raises(RunDirectoryInUse):  # alive: refused
            RunLock(out, timeout_s=300).acquire()
        zombie.kill()
        deadline = time.time() + 10
        while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
            time.sleep(0.05)
        lock = RunLock(out, timeout_s=300).acquire()  # dead but not waited for
        assert "has ended" in lock.took_over
        lock.release()
    finally:
        zombie.kill()
        zombie.wait()


def test_a_reused_pid_is_not_the_holder(tmp_path):
    out = tmp_path / "run"
    plant(out, heartbeat_age_s=0, pid=os.getppid(), pid_start="1")  # alive, but started later
    lock = RunLock(out, timeout_s=300).acquire()
    assert "has ended" in lock.took_over
    lock.release()


def test_other_hosts_are_judged_by_their_heartbeat(tmp_path):
    out = tmp_path / "run"
    plant(out, age_s=1000, heartbeat_age_s=5, host="node-b", pid=999999)
    with pytest.raises(RunDirectoryInUse, match="host node-b, pid 999999, no Slurm job, heartbeat 5 s ago"):
        RunLock(out, timeout_s=60).acquire()
    plant(out, age_s=1000, heartbeat_age_s=61, host="node-b", pid=999999)
    lock = RunLock(out, timeout_s=60).acquire()
    assert "its heartbeat is 61 s old, more than train.lock_timeout_s=60" in lock.took_over
    lock.release()


def test_another_pid_namespace_is_judged_by_its_heartbeat_not_its_pid(tmp_path):
    """A container on this host: its pids mean nothing here."""
    out = tmp_path / "run"
    plant(out, heartbeat_age_s=0, pid=999999, pid_namespace="pid:[1]")
    with pytest.raises(RunDirectoryInUse):
        RunLock(out, timeout_s=300).acquire()


def test_a_former_holders_heartbeat_does_not_keep_a_lock_alive(tmp_path):
    out = tmp_path / "run"
    plant(out, age_s=100, host="node-b")  # started 100 s ago, no heartbeat of its own since
    (out / (LOCK_NAME + ".heartbeat")).write_text(json.dumps({"token": "earlier", "time": time.time()}))
    lock = RunLock(out, timeout_s=60).acquire()
    assert "100 s old" in lock.took_over
    lock.release()


def test_the_same_slurm_job_takes_over_its_own_lock_at_once(tmp_path, monkeypatch):
    """A requeued job restarts on another node: the host differs, the heartbeat is fresh."""
    out = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    plant(out, heartbeat_age_s=0, host="node-a", job="4242")
    lock = RunLock(out, timeout_s=300, identity=other_host(job=run_lock.slurm_job())).acquire()
    assert "it belongs to this Slurm job (4242), restarted" in lock.took_over
    lock.release()
    plant(out, heartbeat_age_s=0, host="node-a", job="4241")
    with pytest.raises(RunDirectoryInUse, match="scancel 4241"):
        RunLock(out, timeout_s=300, identity=other_host(job="4242")).acquire()


def test_array_tasks_are_named_as_scancel_names_them(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1007")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1000")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert run_lock.slurm_job() == "1000_7"
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert run_lock.slurm_job() == "1007"


def test_a_damaged_lock_is_judged_by_its_age(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("not json")
    with pytest.raises(RunDirectoryInUse, match="an unreadable lock record"):
        RunLock(out, timeout_s=60).acquire()
    os.utime(out / LOCK_NAME, (time.time() - 120, time.time() - 120))
    lock = RunLock(out, timeout_s=60).acquire()
    assert lock.took_over
    lock.release()


def test_a_lock_replaced_since_it_was_judged_is_not_removed(tmp_path):
    """Between reading a stale lock and removing it, the lock may have been replaced: the
    removal checks the token of what it moved aside and puts a newer lock back."""
    out = tmp_path / "run"
    stale = plant(out, age_s=1000, host="node-b")
    fresh = plant(out, heartbeat_age_s=0, host="node-c")
    assert not _remove_if_token(out / LOCK_NAME, stale["token"])
    assert held_token(out) == fresh["token"]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, LOCK_NAME + ".heartbeat"]
    assert _remove_if_token(out / LOCK_NAME, fresh["token"])
    assert not (out / LOCK_NAME).exists()


def test_no_lock_is_created_or_taken_over_while_another_process_holds_the_gate(tmp_path):
    """Creating, taking over and releasing the lock happen under the gate file: a taker that
    finds it held waits, and takes the lock once the gate is free."""
    out = tmp_path / "run"
    stale = plant(out, age_s=1000, host="node-b")
    holder = RunLock(out, timeout_s=60, identity=other_host(host="node-c"))
    gate = holder._enter_gate()
    assert gate is not None and holder._enter_gate() is None
    taker = RunLock(out, timeout_s=60, identity=other_host(host="node-d"))
    result = {}
    thread = threading.Thread(target=lambda: result.update(lock=taker.acquire()))
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive() and held_token(out) == stale["token"]  # waits at the gate
    holder._leave_gate(gate)
    thread.join(10)
    assert result["lock"].took_over and held_token(out) == result["lock"].record["token"]
    result["lock"].release()
    assert sorted(p.name for p in out.iterdir()) == []


def test_a_gate_left_by_a_dead_process_is_cleared(tmp_path):
    out = tmp_path / "run"
    stale = plant(out, age_s=1000, host="node-b")
    (out / (LOCK_NAME + ".gate")).write_text(json.dumps({"token": "t", "time": time.time() - 61}))
    lock = RunLock(out, timeout_s=60, identity=other_host()).acquire()
    assert stale["token"] != lock.record["token"] and held_token(out) == lock.record["token"]
    assert lock.took_over
    lock.release()


def _take(out, start, results, name):
    start.wait()
    try:
        lock = RunLock(out, timeout_s=60, identity=other_host(host=name),
                       on_lost=lambda holder: None).acquire()
        results.put((name, lock.record["token"]))
        os._exit(0)  # hold it: a dead winner's lock stays for the check
    except RunDirectoryInUse:
        results.put((name, None))
        os._exit(0)


@pytest.mark.parametrize("round_", range(int(os.environ.get("LOCK_RACE_ROUNDS", 10))))
def test_of_many_takers_of_a_stale_lock_exactly_one_wins(tmp_path, round_):
    out = tmp_path / "run"
    plant(out, age_s=1000, host="node-b")
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.SimpleQueue()  # put() is written at once
    takers = [ctx.Process(target=_take, args=(out, start, results, f"taker-{i}")) for i in range(6)]
    for p in takers:
        p.start()
    start.set()
    for p in takers:
        p.join(timeout=60)
        assert p.exitcode == 0
    outcomes = dict(results.get() for _ in takers)
    winners = {name: token for name, token in outcomes.items() if token}
    assert len(winners) == 1, outcomes
    assert held_token(out) == next(iter(winners.values()))
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, LOCK_NAME + ".heartbeat"]


def test_a_holder_learns_it_lost_the_lock_and_keeps_its_successors(tmp_path):
    """A holder paused past the timeout finds its lock taken over at its next heartbeat; its
    release then leaves the successor's lock alone."""
    out = tmp_path / "run"
    lost = threading.Event()
    seen = {}

    def on_lost(holder):
        seen.update(holder)
        lost.set()

    first = RunLock(out, timeout_s=300, identity={**this_process(), "job": "9"}, on_lost=on_lost,
                    heartbeat_s=0.05).acquire()
    second = RunLock(out, timeout_s=300, identity=other_host(job="9")).acquire()  # its requeue
    assert lost.wait(10)
    assert seen["token"] == second.record["token"] and seen["host"] == "node-b"
    first.release()
    assert held_token(out) == second.record["token"]
    second.release()
    assert not (out / LOCK_NAME).exists()


def test_a_removed_lock_file_is_recreated_by_its_holder(tmp_path):
    out = tmp_path / "run"
    lock = RunLock(out, timeout_s=300, on_lost=lambda holder: pytest.fail("lost"),
                   heartbeat_s=0.05).acquire()
    (out / LOCK_NAME).unlink()
    deadline = time.time() + 10
    while not (out / LOCK_NAME).exists() and time.time() < deadline:
        time.sleep(0.02)
    assert held_token(out) == lock.record["token"]
    lock.release()


def test_a_holder_that_lost_its_lock_exits_1_with_one_line(tmp_path):
    out = tmp_path / "run"
    code = ("import sys, time; from aim_megatron.training.run_lock import RunLock;"
            f"RunLock({str(out)!r}, timeout_s=300, heartbeat_s=0.05).acquire();"
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    plant(out, heartbeat_age_s=0, host="node-b", pid=77, job="55")  # forced over it
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"aim-pretrain: lost the writer lock of {out}"), err
    assert "host node-b, pid 77, Slurm job 55" in lines[0]


def test_a_timeout_must_be_positive():
    from aim_megatron.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"train.lock_timeout_s=0.0: must be > 0"):
        load_config(TINY_CONFIG, ["train.lock_timeout_s=0"]).validate()


# --------------------------------------------------------------------------- trainers


def trainer(out, *overrides, env=None, prefix=()):
    command = [*prefix, sys.executable, "-m", "aim_megatron.train", "--config", TINY_CONFIG,
               "train.micro_batch_size=4", "train.global_batch_size=4", "train.log_interval=1",
               "train.tensorboard=false", "train.eval_iters=1", "data.num_workers=0",
               f"train.output_dir={out}", *overrides]
    environment = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **(env or {}))
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        if name not in (env or {}):
            environment.pop(name, None)
    return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_training(proc, out, records=2):
    """Until the trainer has logged ``records`` steps (it holds the lock and writes)."""
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"loss"') >= records:
            return
        time.sleep(0.1)
    raise AssertionError(f"the trainer did not start training: {proc.communicate()}")


def logged_steps(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def test_a_second_trainer_on_a_run_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    first = trainer(out, "train.train_iters=100000", "train.save_interval=5")
    try:
        wait_training(first, out, records=6)  # it has saved step 5 as well
        second = trainer(out, "train.train_iters=20", "train.seed=99", "train.save_interval=2")
        _, err = second.communicate(timeout=180)
        assert second.returncode == 1, err
        line = [x for x in err.splitlines() if x.startswith("aim-pretrain:")]
        assert len(line) == 1, err
        assert line[0].startswith(f"aim-pretrain: run directory {out} is in use by another writer "
                                  f"(host {this_process()['host']}, pid {first.pid}, no Slurm job, "
                                  f"heartbeat "), line
        assert first.poll() is None, "the first run goes on"
        first.send_signal(signal.SIGTERM)  # checkpoint and stop, as on preemption
        _, first_err = first.communicate(timeout=180)
        assert first.returncode == 3, first_err
    finally:
        stop(first)
    steps = logged_steps(out)
    assert steps == list(range(1, len(steps) + 1)), "every step once, in order"
    assert "seed: 1234" in (out / "config.yaml").read_text()  # the first run's, not the second's
    saved = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert saved and all(int(name[5:]) % 5 == 0 or int(name[5:]) == steps[-1] for name in saved), saved
    assert not (out / LOCK_NAME).exists(), "released at exit"


def _own_pid_namespace() -> list:
    """A prefix that runs a command in a pid namespace of its own, where this host's pids say
    nothing about it (like a holder on another node); [] where that is not allowed."""
    prefix = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else []


def kill_holder(proc, out, prefix):
    """kill -9 of the trainer; without a pid namespace, its record is moved to another host so
    that only the heartbeat can tell it died (as for a node that went down)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    if not prefix:
        lock = out / LOCK_NAME
        lock.write_text(json.dumps({**json.loads(lock.read_text()), "host": "node-that-died"}))


def test_a_killed_holders_lock_is_taken_over_after_the_timeout(tmp_path):
    out = tmp_path / "run"
    prefix = _own_pid_namespace()
    first = trainer(out, "train.train_iters=100000", "train.lock_timeout_s=4", prefix=prefix)
    try:
        wait_training(first, out)
        kill_holder(first, out, prefix)
        killed_at = time.time()
        with pytest.raises(RunDirectoryInUse):  # within the timeout it still counts as held
            RunLock(out, timeout_s=4).acquire()
        time.sleep(max(0.0, killed_at + 4.5 - time.time()))
        second = trainer(out, "train.train_iters=3", "train.lock_timeout_s=4", "--resume", "none")
        _, err = second.communicate(timeout=180)
    finally:
        stop(first)
    assert second.returncode == 0, err
    took = [x for x in err.splitlines() if "took over the writer lock" in x]
    assert len(took) == 1 and "more than train.lock_timeout_s=4" in took[0], err
    age = float(took[0].split("its heartbeat is ")[1].split(" s old")[0])
    assert 4 < age < time.time() - killed_at + 10
    assert not (out / LOCK_NAME).exists()


def test_a_requeued_slurm_job_takes_over_its_own_lock_at_once(tmp_path):
    out = tmp_path / "run"
    prefix = _own_pid_namespace()
    job = {"SLURM_JOB_ID": "4242"}
    first = trainer(out, "train.train_iters=100000", "train.save_interval=2", env=job, prefix=prefix)
    try:
        wait_training(first, out, records=3)
        deadline = time.time() + 120
        while not (out / "checkpoints" / "latest").exists() and time.time() < deadline:
            time.sleep(0.1)  # a checkpoint to resume from
        kill_holder(first, out, prefix)  # Slurm ends the old incarnation, then requeues it
        second = trainer(out, "train.train_iters=4", env=job)  # lock_timeout_s stays 300
        _, err = second.communicate(timeout=180)
    finally:
        stop(first)
    assert second.returncode == 0, err
    took = [x for x in err.splitlines() if "took over the writer lock" in x]
    assert len(took) == 1 and "it belongs to this Slurm job (4242), restarted" in took[0], err
    assert "resumed from" in err


def test_every_rank_of_a_refused_run_exits_1_and_none_writes(tmp_path):
    """Only rank 0 takes the lock; the others learn its refusal and exit with it."""
    out = tmp_path / "run"
    plant(out, heartbeat_age_s=0, host="node-b", pid=77, job="55")
    before = sorted(p.name for p in out.iterdir())
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "aim_megatron.train", "--config", TINY_CONFIG, "train.tensorboard=false",
         f"train.output_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("aim-pretrain:")]
    assert len(lines) == 1 and "in use by another writer (host node-b, pid 77, Slurm job 55" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == before
