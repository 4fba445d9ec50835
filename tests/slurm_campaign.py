"""What the two real-Slurm campaigns (test_slurm_real.py, test_slurm_faults.py) share: the local
cluster, a snapshot of the code the jobs run, the reference run, job state, and the wait for every
job to end by itself (requeued jobs included)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT

CONFIG = "examples/configs/aim_tiny_synthetic.yaml"


def start_cluster(nodes: int, test_file: str):
    """Generator for a module fixture: scripts/slurm_cluster.sh with ``nodes`` nodes, stopped after."""
    assert os.geteuid() == 0, f"{test_file} needs root (it starts slurmctld/slurmd)"
    assert Path("/usr/sbin/slurmctld").exists() and Path("/usr/sbin/munged").exists(), \
        "slurm-wlm/munge missing: run scripts/setup.sh"
    r = subprocess.run(["bash", "scripts/slurm_cluster.sh", "start", "--nodes", str(nodes)], cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    yield
    subprocess.run(["bash", "scripts/slurm_cluster.sh", "stop"], cwd=ROOT, timeout=120)


def snapshot_repo(tmp_path_factory) -> Path:
    """A copy of the code the jobs run: requeued jobs restart minutes later, and a working tree
    edited meanwhile (another config default) would make the resume refuse the checkpoint."""
    snap = tmp_path_factory.mktemp("repo")
    for part in ("aim_megatron", "examples", "tools"):
        shutil.copytree(ROOT / part, snap / part, ignore=shutil.ignore_patterns("__pycache__"))
    return snap


def start_reference(repo: Path, overrides: list[str], out: Path) -> subprocess.Popen:
    """The uninterrupted run (one process) whose losses every job must end with."""
    return subprocess.Popen([sys.executable, "-m", "aim_megatron.train", "--config", CONFIG, *overrides,
                             f"train.output_dir={out}"], cwd=repo, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def steps_done(out: Path) -> int:
    try:
        return len(losses(out))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def job(jid: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True).stdout
    return dict(re.findall(r"(?:^|\s)(\w+)=(\S*)", text.splitlines()[0] if text.strip() else ""))


def wait_until_finished(jobs: dict[str, str], outs: dict[str, Path], timeout_s: float
                        ) -> tuple[dict[str, str], dict[str, int]]:
    """Waits for every job to end: COMPLETED with its run complete, or failed for good. Returns
    ({name: final state or "not finished: STATE"}, {name: Slurm's restart count})."""
    states, failing, pending_since = {}, {}, {}

    def finished(name, jid):
        info = job(jid)
        state = info.get("JobState")
        if state == "PENDING" and info.get("Reason") == "BeginTime":   # a requeued job waits ~2 min
            # ...but not less than a few seconds: slurmd revokes the old run's credential, and a
            # restart within the same second gets "Job credential revoked" and fails the job.
            if time.time() - pending_since.setdefault(name, time.time()) > 3:
                subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], capture_output=True)
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            # a job that requeues itself shows FAILED for a moment before it is pending again
            first = failing.setdefault(name, time.time())
            return state if time.time() - first > 15 else None
        failing.pop(name, None)
        # COMPLETED alone is not enough: the batch shell of a signalled run also ends with 0
        metrics = outs[name] / "metrics.jsonl"
        done = metrics.exists() and '"event": "complete"' in metrics.read_text()
        return state if state == "COMPLETED" and done else None

    deadline = time.time() + timeout_s
    while len(states) < len(jobs) and time.time() < deadline:
        for name, jid in jobs.items():
            if name not in states and (state := finished(name, jid)):
                states[name] = state
        time.sleep(0.5)
    for name, jid in jobs.items():
        if name not in states:
            states[name] = f"not finished: {job(jid).get('JobState')}"
    return states, {name: int(job(jid).get("Restarts", -1)) for name, jid in jobs.items()}


def job_log(c: dict, name: str) -> str:
    return c["logs"][name].read_text() if c["logs"][name].exists() else "(no log)"
