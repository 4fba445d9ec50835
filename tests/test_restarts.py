"""training/restarts.py without Slurm: which failures restart and how (relaunch in the allocation,
requeue, stop), the restart budget, a crash loop at one step, bad input and divergence never
restarting, the record of each restart (cause, steps lost, time to resume), and the two wrappers
that make exit codes say what happened (the trainer's crash code, torchrun's killed worker)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aim_megatron.training import restarts
from aim_megatron.training.restarts import EXIT_CRASH, Situation
from conftest import ROOT


def run_dir(tmp_path: Path, last_step: int, checkpoint: int) -> Path:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n"
                                               for s in range(1, last_step + 1)) + '{"step": 9')
    if checkpoint:
        (out / "checkpoints" / "latest").write_text(f"step_{checkpoint:08d}\n")
    return out


def situation(**kw) -> Situation:
    base = dict(job="7", incarnation=0, max_restarts=5, exit_code=137, last_step=12, resume_step=10,
                world=2)
    return Situation(**{**base, **kw})


def test_run_files_give_the_lost_steps(tmp_path):
    out = run_dir(tmp_path, last_step=13, checkpoint=10)   # the last line was cut by the crash
    assert restarts.last_logged_step(out) == 13 and restarts.checkpoint_step(out) == 10
    assert restarts.last_logged_step(tmp_path / "none") == 0 == restarts.checkpoint_step(tmp_path)


def test_a_crash_relaunches_in_the_allocation_and_records_cause_and_lost_steps():
    history = []
    s = situation(ranks={0: {"rank": 0, "code": EXIT_CRASH, "node": "n1",
                             "detail": "RuntimeError: Connection closed by peer"}})
    d = restarts.decide(s, history)
    assert d.word == "relaunch", d
    assert "restart 1/5 (in this allocation) after a crash at step 12: resuming from step 10, " \
           "2 step(s) lost" in d.message
    assert "rank 0 on n1 raised: RuntimeError" in d.message
    assert "rank(s) [1] left no record (killed: the step ended with exit 137 (SIGKILL)" in d.message
    assert history[-1]["counted"] and history[-1]["lost_steps"] == 2 and history[-1]["decision"] == "relaunch"
    # the restarted trainer's first logged step gives the time to resume, from the last step before
    failed_at = history[-1]["failed_at"]
    d = restarts.decide(situation(exit_code=0, first_step={"time": failed_at + 42.0, "step": 11}), history)
    assert d.word == "done" and "1 restart(s) of job 7 after failures, 2 step(s) lost in all" in d.message
    assert history[0]["resumed_after_s"] == 42.0


def test_a_killed_worker_under_torchrun_is_named_with_its_signal():
    d = restarts.decide(situation(exit_code=139, ranks={1: {"rank": 1, "code": -11, "node": "n2"}}), [])
    assert d.word == "relaunch" and "rank 1 on n2 killed by SIGSEGV" in d.message


@pytest.mark.parametrize("code,what", [(1, "bad input"), (2, "diverged")])
def test_bad_input_and_divergence_never_restart(code, what):
    history = []
    # whatever the launcher says (srun's 137 after --kill-on-bad-exit, torchrun's 1)
    for launcher_code in (code, 137, 1):
        d = restarts.decide(situation(exit_code=launcher_code,
                                      ranks={0: {"rank": 0, "code": code}}), history)
        assert d.word == "stop" and f"exited {code} ({what})" in d.message, d
    assert history == []   # nothing spent from the budget


def test_the_budget_bounds_the_restarts():
    history = []
    words = [restarts.decide(situation(max_restarts=2, last_step=12 + 3 * k, resume_step=10 + 3 * k),
                             history).word for k in range(3)]
    assert words == ["relaunch", "relaunch", "stop"]
    assert "restart budget spent: 2 restart(s) of job 7 already (train.max_restarts=2)" in \
        restarts.decide(situation(max_restarts=2, last_step=40), history).message
    # another job (a new submission on the same output directory) has its own budget
    assert restarts.decide(situation(job="8", max_restarts=2), history).word == "relaunch"
    # 0: a failure ends the job
    assert restarts.decide(situation(max_restarts=0), []).word == "stop"


def test_a_crash_loop_at_one_step_stops_with_one_line():
    history = []
    words = [restarts.decide(situation(max_restarts=10), history).word for _ in range(3)]
    assert words == ["relaunch", "relaunch", "stop"]
    message = history and restarts.decide(situation(max_restarts=10), history).message
    assert "failed 4 times in a row at step 12" in message and "\n" not in message
    # progress between the crashes is no loop
    history = []
    words = [restarts.decide(situation(last_step=12 + k), history).word for k in range(4)]
    assert words == ["relaunch"] * 4


def test_announced_stops_requeue_without_spending_the_budget():
    history = []
    for marker, code in (({"step": 4, "signal": 15}, 1), (None, 3)):
        d = restarts.decide(situation(exit_code=code, marker=marker, max_restarts=0), history)
        assert d.word == "requeue", d
    assert not any(e["counted"] for e in history)


def test_a_hang_requeues_and_counts():
    history = []
    d = restarts.decide(situation(exit_code=143, marker={"step": 8, "signal": "hang", "stuck_ranks": [1]}),
                        history)
    assert d.word == "requeue" and "stuck rank(s) [1]" in d.message and history[-1]["counted"]
    # its next start was asked for: not a second failure
    assert restarts.begin(situation(incarnation=1, exit_code=None), history).word == "go"
    assert len(history) == 1


def test_time_to_resume_spans_a_stop_before_the_first_step():
    """A hang requeues; the requeued run is stopped by a signal before its first step and requeued
    again (uncounted); the next run's first step ends the hang's time to resume too."""
    history = []
    restarts.decide(situation(exit_code=3, marker={"step": 6, "signal": "hang", "stuck_ranks": [1]}), history)
    hang_failed = history[0]["failed_at"]
    restarts.begin(situation(incarnation=1, exit_code=None), history)
    restarts.decide(situation(incarnation=1, exit_code=3, marker={"step": 5, "signal": 0}), history)
    restarts.begin(situation(incarnation=2, exit_code=None), history)
    d = restarts.decide(situation(incarnation=2, exit_code=0,
                                  first_step={"time": history[-1]["time"] + 5.0, "step": 6}), history)
    assert d.word == "done"
    hang = next(e for e in history if e["counted"])
    assert hang["resumed_after_s"] == round(history[-1]["time"] + 5.0 - hang_failed, 1) > 0


def test_a_requeue_by_slurm_that_no_decision_asked_for_counts_as_a_failure():
    history = []
    d = restarts.begin(situation(incarnation=1, exit_code=None, nodes_lost="n3"), history)
    assert d.word == "go" and "requeued by Slurm without a decision of its own" in d.message
    assert "node(s) of its last start down now: n3" in d.message and history[-1]["counted"]
    assert history[-1]["lost_steps"] == 2
    # over the budget: the start stops
    assert restarts.begin(situation(incarnation=2, exit_code=None, max_restarts=1), history).word == "stop"
    assert restarts.begin(situation(incarnation=0, exit_code=None), []).word == "go"


def test_a_relaunch_overtaken_by_slurms_requeue_is_one_failure():
    """A node lost: its peers crash first, the batch script decides to relaunch, then NODE_FAIL
    requeues the job before the relaunch resumes (seen on the local cluster): counted once."""
    history = []
    assert restarts.decide(situation(nodes_lost="n2"), history).word == "relaunch"
    d = restarts.begin(situation(incarnation=1, exit_code=None, nodes_lost="n2"), history)
    assert d.word == "go" and "requeued by Slurm without a decision of its own" in d.message
    counted = [e for e in history if e["counted"]]
    assert len(counted) == 1 and counted[0]["kind"] == "requeue by Slurm", history
    assert history[0]["superseded_by"] == "requeue by Slurm" and "restart 1/5" in d.message
    # a relaunch that did resume is a failure of its own: a later requeue counts again
    history = []
    restarts.decide(situation(nodes_lost="n2"), history)
    history[-1]["resumed_after_s"] = 30.0
    restarts.begin(situation(incarnation=1, exit_code=None), history)
    assert sum(e["counted"] for e in history) == 2


def test_a_lost_node_relaunches_on_the_nodes_left_only_where_the_layout_divides():
    d = restarts.decide(situation(nodes_lost="n2", fits_on_fewer_nodes=True), [])
    assert d.word == "relaunch" and "node loss" in d.message and "node(s) lost: n2" in d.message
    d = restarts.decide(situation(nodes_lost="n2", fits_on_fewer_nodes=False), [])
    assert d.word == "requeue" and "does not divide on the nodes left" in d.message


def command(tmp_path, *args, config_args=()):
    return subprocess.run([sys.executable, "-m", "aim_megatron.training.restarts", *args,
                           "--state-dir", str(tmp_path / "state"), "--job", "7",
                           "--config", "examples/configs/aim_tiny_synthetic.yaml",
                           f"train.output_dir={tmp_path / 'run'}", *config_args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_command_line_reads_the_run_and_the_config(tmp_path):
    run_dir(tmp_path, last_step=7, checkpoint=5)
    state = tmp_path / "state"
    restarts.write_rank_record(state, 1, EXIT_CRASH, "RuntimeError: boom")
    r = command(tmp_path, "decide", "--exit-code", "4", "--world", "2",
                config_args=["train.max_restarts=3"])
    assert r.returncode == 0, r.stderr
    word, message = r.stdout.splitlines()
    assert word == "relaunch" and "restart 1/3" in message and "2 step(s) lost" in message
    assert "rank 1 on" in message and "RuntimeError: boom" in message
    assert not list(state.glob("exit_rank*.json"))          # read once
    assert json.loads((state / "history.json").read_text())[0]["resume_step"] == 5
    # a lost node where tp=2 no longer divides the one node left (1 worker): requeue
    r = command(tmp_path, "decide", "--exit-code", "1", "--nodes-lost", "n2", "--nodes-left", "1",
                config_args=["parallel.tp=2", "model.num_heads=4"])
    assert r.stdout.splitlines()[0] == "requeue", r.stdout + r.stderr
    r = command(tmp_path, "decide", "--exit-code", "0", config_args=["train.bogus=1"])
    assert r.returncode == 1 and r.stdout.splitlines()[0] == "stop" and "unknown field" in r.stdout


def test_train_wrapper_records_bad_input_and_crashes(tmp_path, monkeypatch):
    monkeypatch.setenv("AIM_RESTART_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    code = restarts.run_trainer(["--config", "examples/configs/aim_tiny_synthetic.yaml",
                                 "train.bogus=1"])
    assert code == 1 and restarts.read_rank_records(tmp_path)[1]["code"] == 1
    from aim_megatron.training import main as pretrain

    def crash(argv):
        raise RuntimeError("Connection closed by peer\nsecond line")
    monkeypatch.setattr(pretrain, "main", crash)
    assert restarts.run_trainer([]) == EXIT_CRASH
    record = restarts.read_rank_records(tmp_path)[1]
    assert record["code"] == EXIT_CRASH and record["detail"] == "RuntimeError: Connection closed by peer"


def test_torchrun_wrapper_exits_with_the_signal_of_its_killed_worker(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    env = dict(os.environ, AIM_RESTART_DIR=str(tmp_path / "state"), OMP_NUM_THREADS="1")
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "aim_megatron.training.restarts", "torchrun",
                        "--standalone", "--nproc_per_node=1", str(worker)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 128 + 11, r.stderr[-2000:]
    assert "local worker 0 ended with SIGSEGV" in r.stderr
    assert restarts.read_rank_records(tmp_path / "state")[0]["code"] == -11
    assert time.time() - start < 100
