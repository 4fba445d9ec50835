"""Failures no one announces, on a real Slurm cluster (scripts/slurm_cluster.sh): a rank SIGKILLed
(a GPU Xid, the OOM killer), a rank's segfault, a rank raising inside a collective, a node lost (its
slurmd and processes killed: after SlurmdTimeout the job is NODE_FAIL and Slurm requeues it), and a
hung rank. Under both multi-node scripts (torchrun per node, and one srun task
per worker), plus a SIGKILL under single_node.sbatch. Every job must end COMPLETED by itself with
the final losses of an uninterrupted run (exactly on 1 rank, within 1e-4 on 2), having restarted
from its newest complete checkpoint with fewer than train.save_interval steps lost; the restart
history (training/restarts.py) names the cause and the time to resume.

One campaign, as tests/test_slurm_real.py: every job is submitted at once to one cluster (two
nodes a job, plus spares for the jobs whose node is lost); never run both files at once.
Needs root and slurm-wlm + munge (scripts/setup.sh); fails, not skips, without."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from slurm_campaign import (CONFIG, job_log, losses, snapshot_repo, start_cluster, start_reference,
                            steps_done, wait_until_finished)

STEPS = 20
SAVE_INTERVAL = 5
ACT_AFTER = SAVE_INTERVAL + 1   # a fault once the checkpoint of step 5 is complete and a step more ran
HANG_TIMEOUT_S = 45             # the hang jobs' train.hang_timeout_s; the others' is only for the pid
# Synchronous saves: `latest` moves at the step itself, so "fewer than save_interval steps lost" is
# about the restart, not about how long a background write takes on a loaded host (with async
# saves the newest complete checkpoint can be one interval older). No loader workers: 13 jobs of
# 2 ranks share 2 cores.
OVERRIDES = [f"train.train_iters={STEPS}", "train.log_interval=1", "train.tensorboard=false",
             "train.eval_interval=0", f"train.save_interval={SAVE_INTERVAL}", "train.async_save=false",
             "data.num_workers=0"]
FAULT_INJECTION = ROOT / "tests" / "fault_injection"   # sitecustomize.py: raise inside all_reduce


def _rank1_pid(out: Path) -> int:
    return json.loads((out / "heartbeat" / "rank1.json").read_text())["pid"]


def _hosts(nodelist: str) -> list[str]:
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                          text=True, check=True).stdout.split()


LOSSES: list = []   # the lose-node commands in flight: the other jobs' faults need not wait


def _lose(node: str):
    LOSSES.append(subprocess.Popen(["bash", "scripts/slurm_cluster.sh", "lose-node", node], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))


FAULTS = {   # what the test does to a running job: (action(info, out), the restart expected)
    "kill9": (lambda info, out: os.kill(_rank1_pid(out), signal.SIGKILL), "relaunch"),
    "segv": (lambda info, out: os.kill(_rank1_pid(out), signal.SIGSEGV), "relaunch"),
    "raise": (lambda info, out: (out / "raise_now").touch(), "relaunch"),
    # NODE_FAIL: Slurm requeues the job (--requeue); its next start counts the failure ("go")
    "lose_node": (lambda info, out: _lose(_hosts(info["NodeList"])[1]), "go"),
    "hang": (lambda info, out: os.kill(_rank1_pid(out), signal.SIGSTOP), "requeue"),
}
CAUSES = {"raise": "injected fault: rank 1 raised inside all_reduce", "hang": "stuck rank(s) [1]",
          "lose_node": "node(s) of its last start down now: n", "segv": "SIGSEGV", "kill9": "SIGKILL"}
LAUNCHERS = {"torchrun": "multi_node_torchrun.sbatch", "srun": "multi_node_srun.sbatch"}
SCENARIOS = {f"{launcher}_{fault}": (script, 2, fault)
             for launcher, script in LAUNCHERS.items() for fault in FAULTS}
SCENARIOS["single_kill9"] = ("single_node.sbatch", 1, "kill9")
# Not tested: `sbatch --no-kill`. The job then keeps its live node, but on Slurm 22.05 the step that
# spanned the lost node keeps its CPUs there, so every new step waits ("Requested nodes are busy").
NO_KILL: set = set()
SPARE_NODES = 2   # where the jobs that lost a node start again
NODES = sum(nodes for _, nodes, _ in SCENARIOS.values()) + SPARE_NODES


@pytest.fixture(scope="module")
def cluster():
    yield from start_cluster(NODES, "tests/test_slurm_faults.py")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return snapshot_repo(tmp_path_factory)


def latest_step(out: Path) -> int:
    try:
        return int((out / "checkpoints" / "latest").read_text().strip().rsplit("_", 1)[-1])
    except (FileNotFoundError, ValueError):
        return 0


def running() -> dict[str, dict]:
    """Every running job in one squeue call (scontrol per job takes seconds on a loaded host)."""
    text = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i %N %B"], capture_output=True,
                          text=True).stdout
    return {jid: {"NodeList": nodes, "BatchHost": batch}
            for jid, nodes, batch in (line.split() for line in text.splitlines() if line.strip())}


def submit(repo: Path, out: Path, script: str, nodes: int, fault: str, *sbatch_args: str) -> str:
    hang = [f"train.hang_timeout_s={HANG_TIMEOUT_S if fault == 'hang' else 120}"]
    env = dict(os.environ, AIM_PREFLIGHT="0", OMP_NUM_THREADS="1", AIM_PYTHON=sys.executable,
               PYTHONWARNINGS="ignore", AIM_OUTPUT_DIR=str(out))
    if fault == "raise":
        env.update(PYTHONPATH=str(FAULT_INJECTION), AIM_FAULT_RAISE_FILE=str(out / "raise_now"))
    r = subprocess.run(["sbatch", "--parsable", f"--job-name={out.name}", f"--output={out}.log",
                        f"--nodes={nodes}", "-p", "low", *sbatch_args, f"examples/slurm/{script}", CONFIG,
                        *OVERRIDES, *hang], cwd=repo, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


@pytest.fixture(scope="module")
def campaign(cluster, repo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    start = time.time()
    ref_dir = tmp / "reference"
    reference = start_reference(repo, OVERRIDES, ref_dir)
    jobs = {name: submit(repo, tmp / name, script, nodes, fault,
                         *(["--no-kill"] if name in NO_KILL else []))
            for name, (script, nodes, fault) in SCENARIOS.items()}
    outs = {name: tmp / name for name in jobs}
    logs = {name: Path(f"{tmp / name}.log") for name in jobs}

    acted, pending = {}, dict(jobs)
    deadline = time.time() + 360
    while pending:   # each fault once the step-5 checkpoint is complete and step 6 is logged
        assert time.time() < deadline, f"jobs never reached their point: {sorted(pending)}"
        now_running = running()
        for name, jid in list(pending.items()):
            info, out = now_running.get(jid), outs[name]
            victim = out / "heartbeat" / f"rank{SCENARIOS[name][1] - 1}.json"   # rank 1; rank 0 alone
            if info and steps_done(out) >= ACT_AFTER and latest_step(out) >= SAVE_INTERVAL and \
                    victim.exists():
                if SCENARIOS[name][1] == 1:
                    os.kill(json.loads(victim.read_text())["pid"], signal.SIGKILL)
                else:
                    FAULTS[SCENARIOS[name][2]][0](info, out)
                acted[name] = (time.time(), steps_done(out), latest_step(out))
                del pending[name]
        time.sleep(0.2)

    for loss in LOSSES:
        out, _ = loss.communicate(timeout=120)
        assert loss.returncode == 0 and " lost (killed: " in out, out

    states, restarts = wait_until_finished(jobs, outs, 540)
    assert reference.wait(timeout=300) == 0
    print(f"fault campaign: {time.time() - start:.0f} s")
    return dict(jobs=jobs, outs=outs, logs=logs, states=states, restarts=restarts, acted=acted,
                ref=losses(ref_dir))


def history(c, name) -> list[dict]:
    path = c["outs"][name] / "restarts" / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_job_restarts_by_itself_and_ends_with_the_uninterrupted_losses(campaign, name):
    c = campaign
    script, nodes, fault = SCENARIOS[name]
    text = job_log(c, name)
    assert c["states"][name] == "COMPLETED", f"{name}: {c['states'][name]}\n{text[-5000:]}"
    # restarted once, for this fault, from the newest complete checkpoint, losing < save_interval
    events = [e for e in history(c, name) if e["counted"]]
    assert len(events) == 1, f"{name}: {events}\n{text[-4000:]}"
    event = events[0]
    expected = ("relaunch", "node(s) lost: ") if name in NO_KILL else (FAULTS[fault][1], CAUSES[fault])
    assert event["decision"] == expected[0] and expected[1] in event["cause"], event
    assert event["resume_step"] >= c["acted"][name][2] and event["resume_step"] % SAVE_INTERVAL == 0, \
        (event, c["acted"][name])
    assert 0 <= event["lost_steps"] < SAVE_INTERVAL, event
    assert event["resumed_after_s"] is not None and event["resumed_after_s"] > 0, event
    assert re.search(rf"resumed from \S+ at step {event['resume_step']}\b", text), text[-3000:]
    # in the allocation (Slurm's Restarts stays 0), or requeued (the hang; the batch node's loss)
    assert (c["restarts"][name] == 0) == (event["decision"] == "relaunch"), (c["restarts"][name], event)
    if event["decision"] == "relaunch":
        assert "relaunching the training step" in text, text[-3000:]
    got, ref = losses(c["outs"][name]), c["ref"]
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1)), name
    if nodes == 1:
        assert got == ref, name
    else:   # 2 data-parallel ranks (1 after a lost node) sum gradients in another order than 1
        assert all(abs(got[s] - ref[s]) <= 1e-4 * abs(ref[s]) for s in ref), (name, got, ref)
    if name in NO_KILL:   # the job went on with the node left, not the lost one
        assert "the job now runs on 1 node(s)" in text, text[-3000:]
    # One writer per run directory: a restarted incarnation is never refused by its own job's lock
    # (a predecessor that died holding it is taken over at once), and the finished job leaves none.
    assert "is in use by another writer" not in text, text[-3000:]
    for took in re.findall(r"took over the writer lock of \S+ from (.*)", text):
        assert f"it belongs to this Slurm job ({c['jobs'][name]}), restarted" in took, took
    assert not (c["outs"][name] / ".writer.lock").exists(), name
    print(f"{name}: {event['decision']} after {event['kind']} at step {event['last_step']}, resumed "
          f"from {event['resume_step']}: {event['lost_steps']} step(s) lost, "
          f"{event['resumed_after_s']} s to resume, Slurm restarts {c['restarts'][name]}")


def test_a_requeued_job_takes_over_its_own_writer_lock(campaign):
    """Where the failed incarnation died holding the run directory's lock (the hang: its ranks exit
    from the watchdog; a lost node that held rank 0), the requeued one, on whatever node, takes it
    over at once because it is the same Slurm job; at least one requeued job of the campaign does."""
    c = campaign
    requeued = [name for name in SCENARIOS if c["restarts"][name] > 0]
    took_own = [name for name in requeued
                if re.search(r"took over the writer lock of \S+ from .*: it belongs to this Slurm job "
                             rf"\({c['jobs'][name]}\), restarted", job_log(c, name))]
    assert requeued and took_own, (requeued, took_own)
