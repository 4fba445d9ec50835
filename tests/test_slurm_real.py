"""The sbatch scripts on a real Slurm cluster (scripts/slurm_cluster.sh: slurmctld + slurmd on this
machine): for every way Slurm stops a job, the trainer checkpoints at the signalled step, the job
requeues itself, and the resumed run ends with exactly the losses of an uninterrupted run; with all
three launchers (single_node, multi_node_torchrun, multi_node_srun); a hung rank (SIGSTOPped) is
detected by the watchdog and the job requeues and resumes from its last checkpoint; and a scaling
sweep submitted as a job array (one task requeued) ends with collect and fit done by the array.

Every job is submitted at once to one cluster (a node per job, two for the 2-node ones), so the
waits overlap; the tests below each check their part of that one campaign.

Needs root and slurm-wlm + munge (scripts/setup.sh installs them); fails, not skips, without."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_campaign import (CONFIG, job, job_log, losses, snapshot_repo, start_cluster, start_reference,
                            steps_done, wait_until_finished)

STEPS = 40
# Synchronous saves: these jobs test stops, requeues and the watchdog, whose promise is "resume
# from the last periodic checkpoint"; an asynchronous one still being written when a rank hangs
# is not complete, and the run would fall back one interval further (tests/test_checkpoint_faults.py
# covers asynchronous saves under faults).
OVERRIDES = [f"train.train_iters={STEPS}", "train.log_interval=1", "train.tensorboard=false",
             "train.eval_interval=0", "train.save_interval=0", "train.async_save=false"]
HANG_TIMEOUT_S = 30      # train.hang_timeout_s of the hang job: above any step or save under load
HANG_SAVE_INTERVAL = 5


def _stop_rank1(out: Path):
    """SIGSTOP the trainer of rank 1 (its pid is in its heartbeat file)."""
    pid = json.loads((out / "heartbeat" / "rank1.json").read_text())["pid"]
    os.kill(pid, signal.SIGSTOP)


def _run(*cmd):
    return subprocess.run(list(cmd), check=True, capture_output=True)


# Each scenario: script, nodes, when to act (after n steps; 0: as soon as the job runs, i.e. during
# start-up; None: never) and how the job is stopped, plus extra overrides.
SCENARIOS = {
    "timelimit": ("single_node.sbatch", 1, 3, lambda jid, node, out: _run(
        "scancel", "-b", "-s", "USR1", jid), []),                     # what --signal=B:USR1@120 does
    "scancel_term": ("single_node.sbatch", 1, 3, lambda jid, node, out: _run(
        "scancel", "-s", "TERM", jid), []),
    "scontrol_requeue": ("single_node.sbatch", 1, 3, lambda jid, node, out: _run(
        "scontrol", "requeue", jid), []),
    "preempted": ("single_node.sbatch", 1, 3, lambda jid, node, out: _run(
        "sbatch", "-p", "high", "-w", node, "--exclusive", "-o", "/dev/null", "--wrap", "sleep 2"), []),
    "startup": ("single_node.sbatch", 1, 0, lambda jid, node, out: _run(
        "scancel", "-b", "-s", "USR1", jid), []),
    "torchrun_2nodes_term": ("multi_node_torchrun.sbatch", 2, 3, lambda jid, node, out: _run(
        "scancel", "-s", "TERM", jid), []),
    # one task per worker through srun (no torchrun): a clean run, USR1 to the steps, a hung rank
    "srun_2nodes": ("multi_node_srun.sbatch", 2, None, None, []),
    "srun_2nodes_usr1": ("multi_node_srun.sbatch", 2, 3, lambda jid, node, out: _run(
        "scancel", "-s", "USR1", jid), []),
    "srun_2nodes_hang": ("multi_node_srun.sbatch", 2, 8, lambda jid, node, out: _stop_rank1(out),
                         [f"train.save_interval={HANG_SAVE_INTERVAL}",
                          f"train.hang_timeout_s={HANG_TIMEOUT_S}"]),
}
SINGLE_STOPS = ["timelimit", "scancel_term", "scontrol_requeue", "preempted", "startup",
                "torchrun_2nodes_term"]

# The sweep: 2 widths x 2 data sizes of a very small AIM on synthetic images, an array task each;
# task 1 (the longest run) gets scancel -s TERM after 3 steps and must requeue and resume.
SWEEP_BATCH, SWEEP_EVAL = 8, 6
SWEEP_SPEC = {
    "name": "slurm-test",
    "base": {"model": {"preset": "aim-tiny", "head_hidden_size": 32, "head_ffn_hidden_size": 64,
                       "head_num_layers": 1},
             "train": {"micro_batch_size": SWEEP_BATCH, "global_batch_size": SWEEP_BATCH,
                       "lr": 2e-3, "scale_lr": False, "log_interval": 1, "eval_interval": SWEEP_EVAL,
                       "eval_iters": 2, "save_interval": 0, "tensorboard": False},
             "data": {"train_sources": ["synthetic"]}},
    "widths": [16, 32], "depths": [1], "head_dim": 16,
    "images": [12 * SWEEP_BATCH, 36 * SWEEP_BATCH],
    "flops": "aim",
}
SWEEP_REQUEUED = 1
NODES = sum(s[1] for s in SCENARIOS.values()) + 4   # every job at once, plus the 4 sweep tasks


@pytest.fixture(scope="module")
def cluster():
    yield from start_cluster(NODES, "tests/test_slurm_real.py")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return snapshot_repo(tmp_path_factory)


def job_env():
    return dict(os.environ, AIM_PREFLIGHT="0", OMP_NUM_THREADS="1", AIM_PYTHON=sys.executable,
                PYTHONWARNINGS="ignore")


def submit(repo: Path, out: Path, script: str, *sbatch_args: str, overrides=()) -> str:
    r = subprocess.run(["sbatch", "--parsable", f"--job-name={out.name}", f"--output={out}.log",
                        *sbatch_args, f"examples/slurm/{script}", CONFIG, *OVERRIDES, *overrides],
                       cwd=repo, env=dict(job_env(), AIM_OUTPUT_DIR=str(out)),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def submit_sweep(repo: Path, sweep: Path) -> tuple[str, list[str]]:
    """plan + launch --slurm --submit, as a user would; returns the array job id and run names."""
    spec = sweep.parent / "sweep_spec.yaml"
    spec.write_text(yaml.safe_dump(SWEEP_SPEC))
    tool = [sys.executable, "tools/scaling_sweep.py"]
    r = subprocess.run([*tool, "plan", str(spec), "--out", str(sweep)], cwd=repo, env=job_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([*tool, "launch", str(sweep), "--slurm", "--gpus-per-node", "0",
                        "--partition", "low", "--fit-arg=--intermediate", "--fit-arg=--bootstrap=0",
                        "--submit"], cwd=repo, env=job_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    array = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)
    names = [Path(p).name for p in (sweep / "runs.txt").read_text().split()]
    return array, names


@pytest.fixture(scope="module")
def campaign(cluster, repo, tmp_path_factory):
    """Submit every job and the sweep, stop each at its point, wait for all to finish."""
    tmp = tmp_path_factory.mktemp("jobs")
    start = time.time()
    ref_dir = tmp / "reference"
    reference = start_reference(repo, OVERRIDES, ref_dir)
    jobs = {name: submit(repo, tmp / name, script, f"--nodes={nodes}", "-p", "low", overrides=extra)
            for name, (script, nodes, _, _, extra) in SCENARIOS.items()}
    outs = {name: tmp / name for name in jobs}
    logs = {name: Path(f"{tmp / name}.log") for name in jobs}
    sweep = tmp / "sweep"
    array, run_names = submit_sweep(repo, sweep)
    for k, run in enumerate(run_names):
        jobs[f"sweep_{k}"] = f"{array}_{k}"
        outs[f"sweep_{k}"] = sweep / run
        logs[f"sweep_{k}"] = sweep / "logs" / f"{array}_{k}.out"
    actions = {name: (after, action) for name, (_, _, after, action, _) in SCENARIOS.items()
               if action is not None}
    actions[f"sweep_{SWEEP_REQUEUED}"] = (3, lambda jid, node, out: _run("scancel", "-s", "TERM", jid))

    acted, pending = {}, {name: jobs[name] for name in actions}
    deadline = time.time() + 420
    while pending:   # act on each job when it reaches its point
        assert time.time() < deadline, f"jobs never reached their point: {sorted(pending)}"
        for name, jid in list(pending.items()):
            after, action = actions[name]
            info = job(jid)
            ready = info.get("JobState") == "RUNNING" and (after == 0 or steps_done(outs[name]) >= after)
            if after == 0:   # start-up: the batch shell runs, the trainer has not started
                ready = ready and logs[name].exists() and f"job {jid} (restart 0)" in logs[name].read_text()
            if ready:
                action(jid, info["NodeList"].split(",")[0].replace("[", "").split("-")[0], outs[name])
                acted[name] = (time.time(), steps_done(outs[name]))
                del pending[name]
        time.sleep(0.2)

    states, restarts = wait_until_finished(jobs, outs, 600)
    assert reference.wait(timeout=300) == 0
    print(f"campaign: {time.time() - start:.0f} s")
    return dict(jobs=jobs, outs=outs, logs=logs, states=states, restarts=restarts, acted=acted,
                ref=losses(ref_dir), sweep=sweep, run_names=run_names, array=array)


def _checkpoint_and_resume(c, name) -> tuple[list[str], list[str]]:
    text = job_log(c, name)
    assert c["states"][name] == "COMPLETED", f"{name}: {c['states'][name]}\n{text[-3000:]}"
    saved = re.findall(r"checkpointing at step (\d+) and exiting for requeue", text)
    resumed = re.findall(r"resumed from \S+ at step (\d+)", text)
    return saved, resumed


def _same_losses(got: dict, ref: dict, exact: bool, name: str):
    assert sorted(got) == sorted(ref), name
    if exact:
        assert got == ref, name
    else:   # 2 data-parallel ranks sum gradients in another order than 1 process
        assert all(abs(got[s] - ref[s]) <= 1e-4 * abs(ref[s]) for s in ref), name


def test_every_stop_checkpoints_requeues_and_resumes_exactly(campaign):
    c, results = campaign, {}
    ref = c["ref"]
    assert sorted(ref) == list(range(1, STEPS + 1))
    for name in SINGLE_STOPS + ["srun_2nodes_usr1"]:
        saved, resumed = _checkpoint_and_resume(c, name)
        text = job_log(c, name)
        # (a) a checkpoint at the signalled step, and the restart resumed from that very step
        if name == "startup":   # nothing to keep at step 0: no checkpoint, the restart starts afresh
            assert saved == ["0"] and not resumed and not list((c["outs"][name] / "checkpoints").glob(
                "step_00000000")), f"{name}: {saved} {resumed}\n{text[-4000:]}"
        else:
            assert saved and resumed and saved[0] == resumed[0], \
                f"{name}: {saved} {resumed}\n{text[text.find('(restart 1)'):][:4000]}"
        # (b) requeued by itself: the restart counter, with no requeue by the test
        assert c["restarts"][name] >= 1, name
        results[name] = (int(saved[0]), c["acted"][name][1], c["restarts"][name])
        # (c) the same numbers as never stopping (the 2-rank srun run: as the clean 2-rank run)
        got = losses(c["outs"][name])
        if name == "srun_2nodes_usr1":
            assert got == losses(c["outs"]["srun_2nodes"]), name
        else:
            _same_losses(got, ref, exact=SCENARIOS[name][1] == 1, name=name)
    print("scenario: (step checkpointed, steps logged when signalled, restarts)", results)
    assert results["startup"][0] == 0


def test_srun_launcher_runs_clean_on_two_nodes(campaign):
    """multi_node_srun.sbatch: one srun task per worker (srun_task.sh), 2 nodes, to the end."""
    c = campaign
    saved, resumed = _checkpoint_and_resume(c, "srun_2nodes")
    text = job_log(c, "srun_2nodes")
    assert not saved and not resumed and c["restarts"]["srun_2nodes"] == 0, text[-3000:]
    assert "on 2 node(s) x 1 worker(s)" in text and "training step exited with code 0" in text, text[-3000:]
    _same_losses(losses(c["outs"]["srun_2nodes"]), c["ref"], exact=False, name="srun_2nodes")


def test_hung_rank_is_detected_and_the_job_resumes_from_its_last_checkpoint(campaign):
    """SIGSTOP rank 1 of a running srun job: rank 0's watchdog names rank 1 within
    train.hang_timeout_s, dumps its stacks, exits 3 with the requeue marker; the job requeues by
    itself and resumes from the last train.save_interval checkpoint to the end."""
    c, name = campaign, "srun_2nodes_hang"
    saved, resumed = _checkpoint_and_resume(c, name)
    text = job_log(c, name)
    line = next((ln for ln in text.splitlines() if "hang detected: rank 0" in ln), None)
    assert line and "stuck rank(s): 1;" in line, text[-5000:]
    hung_at = int(re.search(r"after step (\d+)", line).group(1))
    assert "stack of every thread follows" in text and ('File "' in text), text[-5000:]
    assert re.search(r"no progress for (\d+) s", text)
    waited = int(re.search(r"no progress for (\d+) s", text).group(1))
    assert HANG_TIMEOUT_S <= waited <= HANG_TIMEOUT_S + 15, waited      # within the timeout
    # every rank that fired names rank 1 (rank 1 too, woken by the SIGCONT that comes with Slurm's
    # SIGTERM when srun ends the step: it finds its own watchdog thread was silent)
    assert all("stuck rank(s): 1;" in ln for ln in text.splitlines() if "hang detected" in ln), text[-5000:]
    assert '"signal": "hang", "stuck_ranks": [1]' in text and "requeueing job" in text, text[-3000:]
    assert c["restarts"][name] >= 1
    assert not saved and resumed, f"{saved} {resumed}\n{text[-3000:]}"
    # the last periodic checkpoint (the one of step hung_at itself may have been cut by the stop)
    assert int(resumed[0]) % HANG_SAVE_INTERVAL == 0 and \
        hung_at - HANG_SAVE_INTERVAL <= int(resumed[0]) <= hung_at, (resumed, hung_at)
    assert losses(c["outs"][name]) == losses(c["outs"]["srun_2nodes"]), name
    print(f"hang: rank 1 stopped at step {c['acted'][name][1]}, detected after step {hung_at} "
          f"({waited} s), resumed at {resumed[0]}: {hung_at - int(resumed[0])} steps lost, "
          f"restarts {c['restarts'][name]}")


def test_sweep_job_array_ends_in_a_complete_collect_and_fit(campaign):
    """launch --slurm --submit, nothing else: every array task finishes (task 1 after a requeue),
    and the last one to finish collects and fits (AIM_AFTER_SUCCESS -> scaling_sweep.py finish)."""
    c = campaign
    sweep, names = c["sweep"], c["run_names"]
    for k in range(len(names)):
        assert c["states"][f"sweep_{k}"] == "COMPLETED", \
            f"sweep_{k}: {c['states'][f'sweep_{k}']}\n{job_log(c, f'sweep_{k}')[-3000:]}"
    assert c["restarts"][f"sweep_{SWEEP_REQUEUED}"] >= 1
    saved, resumed = _checkpoint_and_resume(c, f"sweep_{SWEEP_REQUEUED}")
    assert saved and saved == resumed[:1], (saved, resumed)
    results = json.loads((sweep / "results.json").read_text())
    assert [r["name"] for r in results] == names
    for r in results:
        assert r["complete"] and r["last_step"] == r["train_iters"], r
        assert r["final_val_step"] == r["train_iters"] and r["final_val_loss"] > 0, r
        assert [s for s, _, _ in r["curve"]] == list(range(SWEEP_EVAL, r["train_iters"] + 1, SWEEP_EVAL)), r
    fit = json.loads((sweep / "fit.json").read_text())
    assert fit["points"] == sum(len(r["curve"]) for r in results) and fit["intermediate"], fit
    assert all(v == v for v in fit["law"].values()), fit["law"]    # no NaN
    assert (sweep / "fit.png").exists()
    logs = "".join(job_log(c, f"sweep_{k}") for k in range(len(names)))
    assert logs.count("runs complete; fitting") == 1, logs[-3000:]
