"""The scale simulation (aim_megatron.scaling.simulate): thousands of GPUs checked in one CPU process.

Each simulated world runs in a subprocess: the fake process group and meta-device patches must not
leak into other tests of this pytest process."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "simulate_scale.py"


def _run(args, timeout=600):
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _last_line(proc) -> str:
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    return lines[-1] if lines else ""


AIM_7B_AT_4096 = ["--preset", "aim-7B", "--gpus", "4096", "--tp", "8", "--pp", "4", "--vp", "2", "--sp",
                  "--distributed-optimizer", "--micro-batch-size", "4", "--global-batch-size", "4096",
                  "--dp-samples", "1"]
AIM_600M_AT_1024 = ["--preset", "aim-600M", "--gpus", "1024", "--tp", "1", "--pp", "1",
                    "--distributed-optimizer", "--micro-batch-size", "4", "--global-batch-size", "4096",
                    "--reshard-gpus", "256", "--reshard-tp", "2", "--reshard-pp", "2"]

# Both presets in one subprocess: megatron's import is paid once. Each run's output and exit code
# come back between markers, as its own tool run would print them.
BOTH_PRESETS = textwrap.dedent("""
    import contextlib, io, json, sys
    from aim_megatron.scaling.simulate import main
    for argv in json.loads(sys.argv[1]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(argv)
        print("=== run", json.dumps({"argv": argv, "rc": code}))
        print(out.getvalue(), end="")
""")


class ToolRun:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture(scope="module")
def preset_runs():
    proc = subprocess.run([sys.executable, "-c", BOTH_PRESETS, json.dumps([AIM_7B_AT_4096, AIM_600M_AT_1024])],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {}
    for part in proc.stdout.split("=== run ")[1:]:
        header, _, out = part.partition("\n")
        meta = json.loads(header)
        runs[meta["argv"][1]] = ToolRun(meta["rc"], out, proc.stderr)
    return runs


def test_aim_7b_at_4096_gpus_passes_every_check(preset_runs):
    proc = preset_runs["aim-7B"]
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "simulate_scale: 4096 GPUs, all checks passed"
    assert "dp=128" in out
    for check in ("(a) ok", "(b) ok", "(c) ok", "(d) ok: reshard 4096 -> 1024 GPUs", "(e) ok"):
        assert check in out, check
    assert "built 33 ranks (32 model-parallel coordinates" in out
    assert "resume at global batch 1000 on DP=64 (was 128)" in out


def test_aim_600m_at_1024_gpus_passes_every_check(preset_runs):
    proc = preset_runs["aim-600M"]
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert out.splitlines()[-1] == "simulate_scale: 1024 GPUs, all checks passed"
    for check in ("(a) ok", "(b) ok", "(c) ok", "(d) ok: reshard 1024 -> 256 GPUs (tp=2 pp=2", "(e) ok"):
        assert check in out, check
    assert "DP=1024" in out


def test_layout_that_does_not_divide_fails_in_one_line():
    proc = _run(["--preset", "aim-7B", "--gpus", "4080", "--tp", "8", "--pp", "4", "--sp",
                 "--distributed-optimizer"], timeout=120)
    assert proc.returncode == 1
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("simulate_scale: world size 4080 is not divisible by tp*pp")
    assert "launch a multiple of 32" in lines[0]


NEGATIVE_CONTROL = textwrap.dedent("""
    import dataclasses, sys, warnings
    warnings.filterwarnings("ignore")
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica
    from aim_megatron.scaling import simulate as sim
    from aim_megatron.scaling.simulate_checks import check_sharding
    from aim_megatron.scaling.simulate_world import CheckFailed, simulate_world, world_metadata

    cfg = sim.build_config("aim-600M", 16, 2, 2, None, True, True, 4, 64)
    world = simulate_world(cfg, 16, dp_samples=1)
    meta = world_metadata(world)
    check_sharding(meta)                          # the honest world passes
    # Off by one: rank 0's main replica of a stacked-layer tensor claims the next layer.
    rank0 = list(meta[0])
    i = next(i for i, s in enumerate(rank0) if isinstance(s, ShardedTensor) and is_main_replica(s.replica_id)
             and s.prepend_axis_num == 1 and s.global_offset[0] == 0)
    off = rank0[i].global_offset
    rank0[i] = dataclasses.replace(rank0[i], global_offset=(off[0] + 1, *off[1:]))
    meta[0] = rank0
    try:
        check_sharding(meta)
    except CheckFailed as exc:
        print("CAUGHT", exc)
        sys.exit(0)
    print("NOT CAUGHT")
    sys.exit(1)
""")


def test_off_by_one_shard_is_caught_by_check_a():
    proc = subprocess.run([sys.executable, "-c", NEGATIVE_CONTROL], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "CAUGHT check (a) failed: replica-0 shards do not cover the tensors exactly once" in proc.stdout


@pytest.mark.parametrize("dp,new_dp,global_batch", [(128, 64, 4096), (1024, 768, 3072)])
def test_data_resume_on_fewer_readers_keeps_global_order(dp, new_dp, global_batch):
    from aim_megatron.config import load_config
    from aim_megatron.scaling import simulate_data

    cfg = load_config(None, ["model.preset=aim-600M", "train.micro_batch_size=1",
                             f"train.global_batch_size={global_batch}"])
    simulate_data.check_global_batches(dp, 1, global_batch, [0, 5])
    simulate_data.check_resume(cfg, dp, new_dp, 777, simulate_data.MIX_WEIGHTS)
