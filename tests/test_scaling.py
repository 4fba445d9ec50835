"""Scaling-law sweeps: the Chinchilla-style fit recovers known laws, bootstrap intervals cover the
truth, the compute-optimal prediction matches its closed form, plots are written, and
plan -> launch --local -> collect -> fit -> predict works against the trainer contract (a fake
trainer that writes metrics.jsonl from a known law)."""
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

from conftest import ROOT
from aim_megatron.scaling.collect import collect_run, read_metrics, record_kind, run_is_complete
from aim_megatron.scaling.fit import (PARAM_NAMES, LossLaw, bootstrap_loss_law, chinchilla_optimum,
                                     compute_frontier, compute_optimal, confidence_intervals, fit_compute_law,
                                     fit_loss_law, flops_model)
from aim_megatron.scaling.launch import LAUNCH_LOG, trainer_command
from aim_megatron.scaling.plan import _run_config, load_manifest, load_sweep, plan_runs, write_runs
from aim_megatron.scaling.plot import plot_fits

TRUE = LossLaw(E=0.3, A=60.0, B=90.0, alpha=0.34, beta=0.28)


def grid_points(n_lo=2e6, n_hi=3e8, d_lo=1e6, d_hi=3e8, k=6):
    N, D = np.meshgrid(np.geomspace(n_lo, n_hi, k), np.geomspace(d_lo, d_hi, k))
    return N.ravel(), D.ravel()


def noisy(law, N, D, noise, seed):
    return law(N, D) * np.exp(np.random.default_rng(seed).normal(0, noise, N.shape))


# --------------------------------------------------------------------------- fitting

def test_fit_recovers_exact_law():
    N, D = grid_points()
    law = fit_loss_law(N, D, TRUE(N, D))
    assert law.as_array() == pytest.approx(TRUE.as_array(), rel=1e-3)


def test_fit_recovers_noisy_law_within_tolerance():
    # 36 runs over 2.2 decades of N and 2.5 of D, 1% log-normal noise. Tolerances are the worst
    # errors over 20 seeds (alpha 0.054, beta 0.010, E 13%, B 14%, A x2) with a small margin.
    N, D = grid_points()
    law = fit_loss_law(N, D, noisy(TRUE, N, D, 0.01, seed=0))
    assert abs(law.alpha - TRUE.alpha) < 0.06
    assert abs(law.beta - TRUE.beta) < 0.02
    assert law.E == pytest.approx(TRUE.E, rel=0.15)
    assert law.B == pytest.approx(TRUE.B, rel=0.20)
    assert abs(math.log(law.A / TRUE.A)) < 0.75
    # Extrapolation 10x beyond the largest run in both N and D: within 4% (worst of 20 seeds 3.3%).
    assert float(law(3e9, 3e9)) == pytest.approx(float(TRUE(3e9, 3e9)), rel=0.04)


def test_fit_needs_two_sizes_of_each_kind():
    N, D = grid_points()
    with pytest.raises(ValueError, match="2 model sizes"):
        fit_loss_law(np.full(6, 1e7), D[:6], TRUE(1e7, D[:6]))


def test_bootstrap_intervals_cover_the_truth():
    N, D = grid_points()
    for seed in range(3):
        L = noisy(TRUE, N, D, 0.01, seed)
        law = fit_loss_law(N, D, L)
        samples = bootstrap_loss_law(N, D, L, law, n_boot=60, seed=seed)
        assert samples.shape == (60, 5)
        ci = confidence_intervals(samples)
        for name, truth in zip(PARAM_NAMES, TRUE.as_array()):
            lo, hi = ci[name]
            assert lo <= truth <= hi, f"seed {seed}: {name}={truth} outside [{lo}, {hi}]"
        # and the intervals are informative, not everything-goes
        assert ci["beta"][1] - ci["beta"][0] < 0.1
        assert ci["alpha"][1] - ci["alpha"][0] < 0.3


def test_compute_law_recovers_exponent():
    C = np.geomspace(1e15, 1e20, 12)
    L = (0.25 + 40.0 * C ** -0.1) * np.exp(np.random.default_rng(1).normal(0, 0.005, C.shape))
    law = fit_compute_law(C, L)
    assert law.gamma == pytest.approx(0.1, abs=0.01)
    assert law.E == pytest.approx(0.25, rel=0.05)


def test_compute_frontier_is_running_minimum():
    C = np.array([4.0, 1.0, 2.0, 3.0, 5.0])
    L = np.array([0.5, 1.0, 1.1, 0.7, 0.6])
    fc, fl = compute_frontier(C, L)
    assert fc.tolist() == [1.0, 3.0, 4.0] and fl.tolist() == [1.0, 0.7, 0.5]


# --------------------------------------------------------------------------- prediction

def test_compute_optimal_matches_closed_form():
    k = 6 * 256
    for C in (1e18, 1e20, 1e22):
        n_closed, d_closed = chinchilla_optimum(TRUE, C, k)
        n_num, d_num = compute_optimal(TRUE, C, k)
        assert n_num == pytest.approx(n_closed, rel=1e-4)
        assert d_num == pytest.approx(d_closed, rel=1e-4)
        assert k * n_num * d_num == pytest.approx(C, rel=1e-9)
    # N_opt grows as C^(beta / (alpha + beta))
    slope = math.log(chinchilla_optimum(TRUE, 1e22, k)[0] / chinchilla_optimum(TRUE, 1e18, k)[0]) / \
        math.log(1e4)
    assert slope == pytest.approx(TRUE.beta / (TRUE.alpha + TRUE.beta), rel=1e-9)
    # G = (alpha A / (beta B))^(1/(alpha+beta)), N_opt = G (C/k)^(beta/(alpha+beta)) by hand at C/k = 1e16
    G = (0.34 * 60 / (0.28 * 90)) ** (1 / 0.62)
    assert chinchilla_optimum(TRUE, 1e16 * k, k)[0] == pytest.approx(G * 1e16 ** (0.28 / 0.62))


def test_fixed_per_image_cost_moves_the_optimum_to_larger_models():
    k, c0, C = 6 * 256, 6 * 256 * 4e8, 1e21     # a 0.4B-param head costs the same for every trunk
    n, d = compute_optimal(TRUE, C, k, c0)
    assert d * (k * n + c0) == pytest.approx(C, rel=1e-9)
    best = float(TRUE(n, d))
    for f in (0.97, 1.03):                        # a local minimum along the budget
        assert float(TRUE(n * f, C / (k * n * f + c0))) > best
    assert n > chinchilla_optimum(TRUE, C, k)[0]


# --------------------------------------------------------------------------- plots

def test_plots_are_written(tmp_path):
    import matplotlib.image

    N, D = grid_points(k=4)
    L = noisy(TRUE, N, D, 0.01, 0)
    law = fit_loss_law(N, D, L)
    C = 6 * 256 * N * D
    fc, fl = compute_frontier(C, L)
    paths = plot_fits(N, D, C, L, law, fit_compute_law(fc, fl), tmp_path)
    assert [p.name for p in paths] == ["fit.png", "residuals.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 20_000
        img = matplotlib.image.imread(p)
        assert img.shape[0] > 300 and img.shape[1] > 900 and img.std() > 0.05   # not blank


# --------------------------------------------------------------------------- metrics parsing

def test_read_metrics_tolerates_truncation_resume_and_duplicates(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "images_seen": 64, "loss": 2.0, "lr": 0.001}\n'
        '{"step": 2, "images_seen": 128, "loss": 1.8, "lr": 0.001}\n'
        '{"step": 2, "val_loss": 1.9}\n'
        '{"step": 3, "images_seen": 192, "lo'                           # killed mid-write...
        '{"step": 3, "images_seen": 192, "loss": 1.7, "lr": 0.001}\n'   # ...resumed, appended
        '{"step": 2, "images_seen": 128, "loss": 1.75, "lr": 0.001}\n'  # re-logged after resume
        'not json at all\n'
        '{"step": 4, "images_seen": 256, "loss": 1.6, "l')              # truncated last line
    records, bad = read_metrics(path)
    assert bad == 2
    assert [(r["step"], r.get("loss"), r.get("val_loss")) for r in records] == [
        (1, 2.0, None), (2, 1.75, None), (2, None, 1.9), (3, 1.7, None)]


def test_collect_run_final_and_intermediate(tmp_path):
    lines = [{"step": s, "images_seen": 32 * s, "loss": 3.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 11)]
    lines.insert(5, {"step": 5, "val_loss": 2.6})
    lines.append({"step": 10, "val_loss": 2.1})
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 11, "ima'   # cut last line
    (tmp_path / "metrics.jsonl").write_text(text)
    run = {"name": "r", "trunk_params": 1000, "images": 320, "flops_per_image": 10.0,
           "train_iters": 10, "global_batch_size": 32}
    res = collect_run(tmp_path, run)
    assert res.complete and res.last_step == 10 and res.unreadable_lines == 1
    assert res.curve == [(5, 160, 2.6), (10, 320, 2.1)]
    assert (res.final_val_step, res.final_val_loss) == (10, 2.1)
    assert res.final_train_loss == pytest.approx(np.mean([2.4, 2.3, 2.2, 2.1, 2.0]))
    incomplete = collect_run(tmp_path, {**run, "train_iters": 20})
    assert not incomplete.complete


def test_run_is_complete_only_after_the_final_evaluation(tmp_path):
    # The trainer logs the last train step, then evaluates, then saves: a run killed in between
    # has an earlier val loss as its last one and must be run (resumed) again.
    def write(cfg_data, records):
        (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": cfg_data}))
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))

    run = {"name": "r", "trunk_params": 1000, "images": 128, "flops_per_image": 10.0,
           "train_iters": 4, "global_batch_size": 32}
    train = [{"step": s, "images_seen": 32 * s, "loss": 1.0, "lr": 1e-3} for s in range(1, 5)]
    shards = {"train_sources": ["shards/a"], "val_sources": ["shards/b"]}
    write(shards, train[:2] + [{"step": 2, "val_loss": 0.9}] + train[2:])
    assert not run_is_complete(tmp_path, 4) and not collect_run(tmp_path, run).complete
    write(shards, train + [{"step": 4, "val_loss": 0.8}])
    assert run_is_complete(tmp_path, 4)
    res = collect_run(tmp_path, run)
    assert res.complete and (res.final_val_step, res.final_val_loss) == (4, 0.8)
    # no validation configured: the last train step is the end (synthetic data validates itself)
    write({"train_sources": ["shards/a"], "val_sources": []}, train)
    assert run_is_complete(tmp_path, 4)
    write({"train_sources": ["synthetic"], "val_sources": []}, train)
    assert not run_is_complete(tmp_path, 4)


def test_trainers_complete_record_decides_and_keeps_the_last_train_record(tmp_path):
    # Synthetic data without a val split: step counts alone cannot tell whether the run validated
    # at the end; the trainer's "complete" record can. It must not replace the step's train record.
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"train_sources": ["synthetic"]}}))
    train = [{"step": s, "images_seen": 32 * s, "loss": 2.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 5)]
    done = {"step": 4, "event": "complete", "images_seen": 128, "skipped_steps": 0}
    run = {"name": "r", "trunk_params": 1000, "images": 128, "flops_per_image": 10.0,
           "train_iters": 4, "global_batch_size": 32}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in train))
    assert not run_is_complete(tmp_path, 4) and not collect_run(tmp_path, run).complete
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in train + [done]))
    records, _ = read_metrics(tmp_path / "metrics.jsonl")
    assert [record_kind(r) for r in records] == ["train"] * 4 + ["event"]
    res = collect_run(tmp_path, run)
    assert run_is_complete(tmp_path, 4) and res.complete and res.last_step == 4
    assert res.final_train_loss == pytest.approx(np.mean([1.9, 1.8, 1.7, 1.6]))
    assert not run_is_complete(tmp_path, 8)   # a record from a shorter schedule does not count


def test_flops_come_from_the_trainers_count(sweep):
    from aim_megatron.scaling import flops
    from aim_megatron.scaling import sizing
    spec, _, out = sweep
    sweep_spec = load_sweep(spec)
    sweep_spec.flops = "aim"
    runs = plan_runs(sweep_spec)
    write_runs(sweep_spec, runs, out)
    for run in runs:
        m = _run_config(sweep_spec, run.model).model
        assert run.flops_per_image == flops.train_flops_per_image(m)   # what the trainer's MFU uses
    manifest = load_manifest(out)
    k, c0 = flops_model(manifest)
    base = _run_config(sweep_spec, {}).model
    assert k == 6 * 49 and c0 == sizing.head_train_flops_per_image(base) > 0
    # k N + c0 leaves out only attention and the few non-matmul parameters of the trunk
    for run in runs:
        assert 0.8 < (k * run.trunk_params + c0) / run.flops_per_image < 1.0


# --------------------------------------------------------------------------- sweep end to end

FAKE_TRAINER = textwrap.dedent('''
    """Fake trainer honouring the contract: --config CFG, metrics.jsonl in train.output_dir,
    exit 3 when asked to simulate preemption. Val loss follows a known L(N, D)."""
    import json, os, sys
    from aim_megatron.config import config_from_dict
    from aim_megatron.scaling.sizing import trunk_params
    import yaml

    args = sys.argv[1:]
    cfg_path = args[args.index("--config") + 1]
    data = yaml.safe_load(open(cfg_path))
    out = data["train"].pop("output_dir")
    keep = ("train_iters", "global_batch_size", "micro_batch_size")
    data["train"] = {k: v for k, v in data["train"].items() if k in keep}
    cfg = config_from_dict(data)
    with open(os.path.join(out, "invocations.jsonl"), "a") as f:
        f.write(json.dumps({"argv": sys.argv, "cwd": os.getcwd()}) + "\\n")
    if os.environ.get("FAKE_PREEMPT") == os.path.basename(out):
        sys.exit(3)
    if os.environ.get("FAKE_FAIL") == os.path.basename(out):
        sys.exit(1)
    E, A, B, alpha, beta = 0.2, 30.0, 50.0, 0.35, 0.3
    n, gbs, iters = trunk_params(cfg.model), cfg.train.global_batch_size, cfg.train.train_iters
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        for step in range(1, iters + 1):
            d = step * gbs
            loss = E + A / n ** alpha + B / d ** beta
            f.write(json.dumps({"step": step, "images_seen": d, "loss": 1.1 * loss, "lr": 1e-3}) + "\\n")
            if step % 4 == 0 or step == iters:
                f.write(json.dumps({"step": step, "val_loss": loss}) + "\\n")
''')

SPEC = {
    "name": "unit",
    "base": {"model": {"preset": "aim-tiny"}, "train": {"global_batch_size": 64, "micro_batch_size": 32}},
    "widths": [32, 64, 128], "depths": [2], "head_dim": 16,
    "images": [640, 1280, 2560],
}


@pytest.fixture
def sweep(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    trainer = tmp_path / "fake_trainer.py"
    trainer.write_text(FAKE_TRAINER)
    return spec, trainer, tmp_path / "sweep"


def tool(*args, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "scaling_sweep.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)


def test_plan_writes_resolved_configs(sweep):
    spec, _, out = sweep
    runs = plan_runs(load_sweep(spec))
    assert [r.name for r in runs][:3] == ["w32-d2-h2-i640", "w32-d2-h2-i1.28e3", "w32-d2-h2-i2.56e3"]
    assert [r.train_iters for r in runs[:3]] == [10, 20, 40]
    assert runs[0].trunk_params == 2 * (12 * 32 * 32 + 4 * 32) + (16 * 32 + 32 + 64) + 64
    write_runs(load_sweep(spec), runs, out)
    data = yaml.safe_load((out / "w64-d2-h4-i640" / "config.yaml").read_text())
    assert data["model"]["hidden_size"] == 64 and data["model"]["num_heads"] == 4
    assert data["train"]["train_iters"] == 10 and data["train"]["output_dir"] == str(out / "w64-d2-h4-i640")
    assert (out / "runs.txt").read_text().splitlines()[0] == str(out / "w32-d2-h2-i640")
    # the written file is a complete config the trainer can load as is
    from aim_megatron.config import config_from_dict, TrainConfig
    if "output_dir" not in TrainConfig.__dataclass_fields__:   # field arrives with the trainer
        data["train"].pop("output_dir")
    assert config_from_dict(data).to_dict()["model"] == data["model"]


def test_auto_dtype_reaches_the_nodes_that_train(sweep, monkeypatch):
    # Planned on a machine without fast bf16 (a login node), a sweep of params_dtype=auto must not
    # pin its runs to that machine's fp32: each run's config keeps "auto" for the node that trains it.
    import torch
    spec, _, out = sweep
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    sweep_spec = load_sweep(spec)
    sweep_spec.base["train"]["params_dtype"] = "auto"
    runs = plan_runs(sweep_spec)
    write_runs(sweep_spec, runs, out)
    for run in runs:
        data = yaml.safe_load((out / run.name / "config.yaml").read_text())
        assert data["train"]["params_dtype"] == "auto", run.name


def test_plan_rejects_bad_grids(sweep, tmp_path):
    spec, _, out = sweep
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SPEC, "widths": [40]}))
    r = tool("plan", bad, "--out", out)
    assert r.returncode == 1 and "width 40 is not a multiple of head_dim 16" in r.stderr
    bad.write_text(yaml.safe_dump({**SPEC, "compute": [1e9]}))
    r = tool("plan", bad, "--out", out)
    assert r.returncode == 1 and "exactly one of 'images'" in r.stderr


def test_trainer_command_construction():
    py = sys.executable
    assert trainer_command("c.yaml") == [py, "-m", "aim_megatron.train", "--config", "c.yaml"]
    assert trainer_command("c.yaml", "fake.py", nproc=2) == [
        py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "fake.py",
        "--config", "c.yaml"]
    assert trainer_command("c.yaml", nproc=4)[5:7] == ["-m", "aim_megatron.train"]


def test_sweep_end_to_end_with_fake_trainer(sweep):
    spec, trainer, out = sweep
    assert tool("plan", spec, "--out", out).returncode == 0

    # A preempted run (exit 3) stops the local sweep with code 3 after the earlier runs finished.
    r = tool("launch", out, "--local", "--trainer", trainer, env={"FAKE_PREEMPT": "w64-d2-h4-i640"})
    assert r.returncode == 3, r.stdout + r.stderr
    assert "rerun launch to resume" in r.stdout
    assert not (out / "w64-d2-h4-i640" / "metrics.jsonl").exists()

    r = tool("launch", out, "--local", "--trainer", trainer, "--jobs", "3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("[skip]") == 3 and r.stdout.count("[run]") == 6
    assert r.stdout.count("[done]") == 6 and "exit 0" in r.stdout
    timing = json.loads((out / "w128-d2-h8-i640" / LAUNCH_LOG).read_text())
    assert timing["exit_code"] == 0 and timing["jobs"] == 3 and timing["cpu_s"] > 0
    inv = [json.loads(x) for x in (out / "w32-d2-h2-i640" / "invocations.jsonl").read_text().splitlines()]
    assert len(inv) == 1   # complete runs are not started again
    assert inv[0]["argv"][1:] == ["--config", str(out / "w32-d2-h2-i640" / "config.yaml")]
    assert inv[0]["cwd"] == str(ROOT)   # the caller's directory, as for a hand-started run

    r = tool("collect", out)
    assert r.returncode == 0 and "9/9 runs complete" in r.stdout
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 9 and all(len(x["curve"]) >= 3 for x in results)

    r = tool("fit", out, "--bootstrap", "20")
    assert r.returncode == 0, r.stderr
    fit = json.loads((out / "fit.json").read_text())
    assert fit["points"] == 9
    assert [fit["law"][k] for k in ("E", "A", "B", "alpha", "beta")] == \
        pytest.approx([0.2, 30.0, 50.0, 0.35, 0.3], rel=2e-3)
    assert (out / "fit.png").stat().st_size > 20_000 and (out / "residuals.png").stat().st_size > 20_000

    r = tool("predict", out / "fit.json", "--compute", "1e15")
    assert r.returncode == 0, r.stderr
    law = LossLaw(**fit["law"])
    n_opt, _ = chinchilla_optimum(law, 1e15, 6 * 49)     # 6ND with 49 patches per image
    assert f"N_opt = {n_opt:.4g}" in r.stdout and "95% CI" in r.stdout


def test_failed_run_stops_new_runs_unless_keep_going(sweep):
    spec, trainer, out = sweep
    assert tool("plan", spec, "--out", out).returncode == 0
    fail = {"FAKE_FAIL": "w32-d2-h2-i1.28e3"}
    r = tool("launch", out, "--local", "--trainer", trainer, "--jobs", "2", env=fail)
    assert r.returncode == 1 and "[fail] w32-d2-h2-i1.28e3: exit code 1" in r.stdout
    # runs already going finish (the third may start when the first ends before the failure is
    # seen); nothing starts after the failure
    started = r.stdout.count("[run]")
    assert started in (2, 3) and r.stdout.count("[done]") == started and "[run]  w64" not in r.stdout
    assert "1 run(s) failed" in r.stdout
    r = tool("launch", out, "--local", "--trainer", trainer, "--jobs", "2", "--keep-going", env=fail)
    assert r.returncode == 1 and r.stdout.count("[skip]") == started - 1
    assert r.stdout.count("[done]") == 9 - (started - 1)
    r = tool("collect", out)
    assert "8/9 runs complete" in r.stdout


def test_slurm_array_script_for_sweep(sweep):
    spec, _, out = sweep
    assert tool("plan", spec, "--out", out).returncode == 0
    r = tool("launch", out, "--slurm", "--gpus-per-node", "1", "--max-parallel", "4",
             "--partition", "gpu", "--sbatch-arg=--qos=high")
    assert r.returncode == 0, r.stderr
    script = (out / "sweep.sbatch").read_text()
    for line in ("#SBATCH --array=0-8%4", "#SBATCH --gpus-per-node=1", "#SBATCH --partition=gpu",
                 "#SBATCH --qos=high", "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue",
                 "export AIM_GPUS_PER_NODE=1",
                 'exec bash examples/slurm/multi_node_torchrun.sbatch "$run_dir/config.yaml"'):
        assert line in script
    assert f"export AIM_REPO={ROOT}" in script
