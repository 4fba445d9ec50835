"""The sbatch scripts on a real Slurm cluster (scripts/slurm_cluster.sh: slurmctld + slurmd on this
machine): for every way Slurm stops a job, the trainer checkpoints at the signalled step, the job
requeues itself, and the resumed run ends with exactly the losses of an uninterrupted run.

Needs root and slurm-wlm + munge (scripts/setup.sh installs them); fails, not skips, without."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

CONFIG = "examples/configs/aim_tiny_synthetic.yaml"
STEPS = 40
OVERRIDES = [f"train.train_iters={STEPS}", "train.log_interval=1", "train.tensorboard=false",
             "train.eval_interval=0", "train.save_interval=0"]
NODES = 7   # every scenario at once, one node each (two for the multi-node ones)


@pytest.fixture(scope="module")
def cluster():
    assert os.geteuid() == 0, "tests/test_slurm_real.py needs root (it starts slurmctld/slurmd)"
    assert Path("/usr/sbin/slurmctld").exists() and Path("/usr/sbin/munged").exists(), \
        "slurm-wlm/munge missing: run scripts/setup.sh"
    r = subprocess.run(["bash", "scripts/slurm_cluster.sh", "start", "--nodes", str(NODES)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    yield
    subprocess.run(["bash", "scripts/slurm_cluster.sh", "stop"], cwd=ROOT, timeout=60)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy of the code the jobs run: requeued jobs restart minutes later, and a working tree
    edited meanwhile (another config default) would make the resume refuse the checkpoint."""
    snap = tmp_path_factory.mktemp("repo")
    for part in ("aim_megatron", "examples", "tools"):
        shutil.copytree(ROOT / part, snap / part, ignore=shutil.ignore_patterns("__pycache__"))
    return snap


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def job(jid: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def submit(repo: Path, out: Path, script: str, *sbatch_args: str) -> str:
    env = dict(os.environ, AIM_OUTPUT_DIR=str(out), AIM_PREFLIGHT="0", OMP_NUM_THREADS="1",
               AIM_PYTHON=sys.executable, PYTHONWARNINGS="ignore")
    r = subprocess.run(["sbatch", "--parsable", f"--job-name={out.name}", f"--output={out}.log",
                        *sbatch_args, f"examples/slurm/{script}", CONFIG, *OVERRIDES],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def wait_for(what, predicate, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def steps_done(out: Path) -> int:
    try:
        return len(losses(out))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def scontrol(*args):
    subprocess.run(["scontrol", *args], check=True, capture_output=True, timeout=30)


# Each scenario: which script and nodes, when to act (after n steps; 0: as soon as the job runs,
# i.e. during start-up) and how Slurm stops the job.
SCENARIOS = {
    "timelimit": ("single_node.sbatch", 1, 3, lambda jid, node: subprocess.run(
        ["scancel", "-b", "-s", "USR1", jid], check=True)),           # what --signal=B:USR1@120 does
    "scancel_term": ("single_node.sbatch", 1, 3, lambda jid, node: subprocess.run(
        ["scancel", "-s", "TERM", jid], check=True)),
    "scontrol_requeue": ("single_node.sbatch", 1, 3, lambda jid, node: scontrol("requeue", jid)),
    "preempted": ("single_node.sbatch", 1, 3, lambda jid, node: subprocess.run(
        ["sbatch", "-p", "high", "-w", node, "--exclusive", "-o", "/dev/null", "--wrap", "sleep 2"],
        check=True, capture_output=True)),
    "startup": ("single_node.sbatch", 1, 0, lambda jid, node: subprocess.run(
        ["scancel", "-b", "-s", "USR1", jid], check=True)),
    "torchrun_2nodes_term": ("multi_node_torchrun.sbatch", 2, 3, lambda jid, node: subprocess.run(
        ["scancel", "-s", "TERM", jid], check=True)),
}


def test_every_stop_checkpoints_requeues_and_resumes_exactly(cluster, repo, tmp_path):
    ref_dir = tmp_path / "reference"
    reference = subprocess.Popen(
        [sys.executable, "-m", "aim_megatron.train", "--config", CONFIG, *OVERRIDES,
         f"train.output_dir={ref_dir}"], cwd=repo, env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    jobs = {name: submit(repo, tmp_path / name, script, f"--nodes={nodes}", "-p", "low")
            for name, (script, nodes, _, _) in SCENARIOS.items()}
    acted, pending = {}, dict(jobs)
    while pending:   # act on each job when it reaches its point
        for name, jid in list(pending.items()):
            script, _, after, action = SCENARIOS[name]
            info = job(jid)
            ready = info.get("JobState") == "RUNNING" and (
                after == 0 or steps_done(tmp_path / name) >= after)
            if after == 0:   # start-up: the batch shell runs, the trainer has not started
                log = Path(f"{tmp_path / name}.log")
                ready = ready and log.exists() and f"job {jid} (restart 0)" in log.read_text()
            if ready:
                action(jid, info["NodeList"].split(",")[0].replace("[", "").split("-")[0])
                acted[name] = time.time()
                del pending[name]
        time.sleep(0.2)

    def finished(name, jid):
        info = job(jid)
        state = info.get("JobState")
        if state == "PENDING" and info.get("Reason") == "BeginTime":   # a requeued job waits ~2 min
            # ...but not less than a few seconds: slurmd revokes the old run's credential, and a
            # restart within the same second gets "Job credential revoked" and fails the job.
            if time.time() - pending_since.setdefault(name, time.time()) > 3:
                subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"],
                               capture_output=True)
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            # a job that requeues itself shows FAILED for a moment before it is pending again
            first = failing.setdefault(name, time.time())
            return state if time.time() - first > 15 else None
        failing.pop(name, None)
        # COMPLETED alone is not enough: the signalled run's batch shell also ends with 0
        done = '"event": "complete"' in (tmp_path / name / "metrics.jsonl").read_text() \
            if (tmp_path / name / "metrics.jsonl").exists() else False
        return state if state == "COMPLETED" and done else None

    states, failing, pending_since = {}, {}, {}
    deadline = time.time() + 600
    while len(states) < len(jobs) and time.time() < deadline:
        for name, jid in jobs.items():
            if name not in states and (state := finished(name, jid)):
                states[name] = state
        time.sleep(0.5)
    results = {}
    for name, jid in jobs.items():
        out = tmp_path / name
        log = Path(f"{out}.log")
        state = states.get(name, f"not finished: {job(jid).get('JobState')}")
        text = log.read_text()
        assert state == "COMPLETED", f"{name}: {state}\n{text[-3000:]}"
        # (a) a checkpoint at the signalled step, and the restart resumed from that very step
        saved = re.findall(r"checkpointing at step (\d+) and exiting for requeue", text)
        resumed = re.findall(r"resumed from \S+ at step (\d+)", text)
        if name == "startup":   # nothing to keep at step 0: no checkpoint, the restart starts afresh
            assert saved == ["0"] and not resumed and not list((out / "checkpoints").glob("step_00000000")), \
                f"{name}: {saved} {resumed}\n{text[-4000:]}"
        else:
            assert saved and resumed and saved[0] == resumed[0], \
                f"{name}: {saved} {resumed}\n{text[text.find('(restart 1)'):][:4000]}"
        # (b) requeued by itself: the restart counter, with no requeue by the test
        assert int(job(jid)["Restarts"]) >= 1, name
        results[name] = (int(saved[0]), int(job(jid)["Restarts"]))
    assert reference.wait(timeout=300) == 0
    ref = losses(ref_dir)
    assert sorted(ref) == list(range(1, STEPS + 1))
    for name in jobs:
        got = losses(tmp_path / name)
        assert sorted(got) == sorted(ref), name
        if SCENARIOS[name][1] == 1:   # (c) the same numbers as never stopping
            assert got == ref, name
        else:                         # 2 data-parallel ranks sum gradients in another order
            assert all(abs(got[s] - ref[s]) <= 1e-4 * abs(ref[s]) for s in ref), name
    print("scenario: (step checkpointed, restarts)", results)
    assert results["startup"][0] == 0
