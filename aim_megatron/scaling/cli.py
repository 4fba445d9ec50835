"""Scaling-law sweeps: plan a grid of runs, launch them, collect losses, fit L(N, D) and L(C), predict.

    python tools/scaling_sweep.py plan examples/sweeps/tiny_cpu.yaml --out runs/sweep-tiny
    python tools/scaling_sweep.py launch runs/sweep-tiny --local [--jobs 2] [--nproc 2] [--keep-going]
    python tools/scaling_sweep.py launch runs/sweep-tiny --slurm --gpus-per-node 8 [--submit]
    python tools/scaling_sweep.py collect runs/sweep-tiny
    python tools/scaling_sweep.py finish runs/sweep-tiny   # collect; fit once every run is complete
    python tools/scaling_sweep.py fit runs/sweep-tiny [--bootstrap 200] [--intermediate]
    python tools/scaling_sweep.py predict runs/sweep-tiny/fit.json --compute 1e21 3e21

See docs/scaling.md. Exit codes: 0 ok, 1 failure or bad input (one line on stderr, see
docs/errors.md), 3 a local run was interrupted (it checkpointed; rerun launch to resume).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from aim_megatron import cli
from aim_megatron.config import PRESETS, ConfigError, ModelConfig, yaml_problem
from aim_megatron.scaling.collect import RunResult, collect, save_results
from aim_megatron.scaling.fit import (FIT, PARAM_NAMES, ComputeLaw, LossLaw, bootstrap_loss_law, compute_frontier,
                                     compute_optimal, confidence_intervals, fit_compute_law, fit_loss_law,
                                     fit_points, flops_model)
from aim_megatron.scaling.launch import REPO_ROOT, launch_local, slurm_array_script
from aim_megatron.scaling.plan import load_manifest, load_sweep, plan_runs, write_runs
from aim_megatron.scaling.plot import plot_fits
from aim_megatron.scaling.sizing import train_flops_per_image, trunk_params


def cmd_plan(args) -> int:
    spec = load_sweep(args.spec)
    runs = plan_runs(spec)
    manifest = write_runs(spec, runs, args.out, force=args.force)
    print(f"{'run':<28} {'N (trunk)':>11} {'images':>11} {'iters':>8} {'FLOPs':>10}")
    for r in runs:
        print(f"{r.name:<28} {r.trunk_params:>11,} {r.images:>11,} {r.train_iters:>8} {r.compute:>10.3g}")
    print(f"{len(runs)} runs written under {manifest.parent} ({spec.flops} FLOPs)")
    return 0


def cmd_launch(args) -> int:
    if args.local:
        return launch_local(args.sweep_dir, args.trainer, args.nproc, args.keep_going, args.dry_run,
                              jobs=args.jobs)
    script = slurm_array_script(args.sweep_dir, REPO_ROOT, args.nodes, args.gpus_per_node, args.time,
                                  args.partition, args.account, args.max_parallel, args.sbatch_arg,
                                  args.fit_arg)
    path = Path(args.sweep_dir) / "sweep.sbatch"
    path.write_text(script)
    (Path(args.sweep_dir) / "logs").mkdir(exist_ok=True)
    print(f"wrote {path}")
    if args.submit:
        if shutil.which("sbatch") is None:
            print("sbatch not found on this machine; submit the script from a Slurm login node",
                  file=sys.stderr)
            return 1
        return subprocess.run(["sbatch", str(path)]).returncode
    print(f"submit with: sbatch {path}")
    return 0


def cmd_collect(args) -> int:
    results = collect(args.sweep_dir)
    js, cs = save_results(results, args.sweep_dir)
    print(f"{'run':<28} {'step':>8} {'done':>5} {'val_loss':>9} {'points':>6}")
    for r in results:
        val = "-" if r.final_val_loss is None else f"{r.final_val_loss:.4f}"
        print(f"{r.name:<28} {r.last_step:>5}/{r.train_iters:<5} {'yes' if r.complete else 'no':>3} "
              f"{val:>9} {len(r.curve):>6}" + (f"  ({r.unreadable_lines} unreadable lines)"
                                               if r.unreadable_lines else ""))
    done = sum(r.complete for r in results)
    print(f"{done}/{len(results)} runs complete; wrote {js} and {cs}")
    return 0


def cmd_finish(args) -> int:
    """What each Slurm array task runs after its run finished: collect; once every run is
    complete, fit. A lock keeps two tasks that finish together from fitting at once."""
    import fcntl
    sweep = Path(args.sweep_dir)
    load_manifest(sweep)  # a clear error before a lock file is created in a wrong directory
    with open(sweep / ".finish.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = _results(args.sweep_dir)
        missing = [r.name for r in results if not r.complete]
        if missing:
            print(f"{len(results) - len(missing)}/{len(results)} runs complete; not fitting yet "
                  f"(waiting for {', '.join(missing)}): the last run to finish fits")
            return 0
        fit = sweep / FIT
        if fit.exists() and all(fit.stat().st_mtime >= (sweep / r.name / "metrics.jsonl").stat().st_mtime
                                for r in results):
            print(f"{len(results)}/{len(results)} runs complete; {fit} is newer than every run: "
                  f"already fitted")
            return 0
        print(f"{len(results)}/{len(results)} runs complete; fitting")
        return cmd_fit(args)


def _results(sweep_dir: str) -> list[RunResult]:
    results = collect(sweep_dir)
    save_results(results, sweep_dir)
    return results


def cmd_fit(args) -> int:
    sweep = Path(args.sweep_dir)
    manifest = load_manifest(sweep)
    N, D, C, L = fit_points(_results(args.sweep_dir), args.metric, args.intermediate)
    law = fit_loss_law(N, D, L, args.delta)
    resid = np.log(L) - np.log(law(N, D))
    out: dict = {"law": {k: float(v) for k, v in law.__dict__.items()}, "points": len(L),
                 "metric": args.metric,
                 "intermediate": args.intermediate, "rms_log_residual": float(np.sqrt(np.mean(resid ** 2))),
                 "flops": manifest["flops"], "tokens_per_image": manifest["tokens_per_image"],
                 "base_model": manifest["base_model"]}
    print(f"L(N, D) = {law.E:.4g} + {law.A:.4g}/N^{law.alpha:.4f} + {law.B:.4g}/D^{law.beta:.4f}"
          f"   ({len(L)} points, rms log-residual {out['rms_log_residual']:.4f})")
    if law.E < 1e-3 * float(np.min(L)):
        out["warning"] = "E -> 0: no loss floor in range"
        print("  warning: E went to 0: these runs show no loss floor, so E (and with it A, alpha) is "
              "not identified; extend the sweep to more data and larger models before extrapolating")
    if args.bootstrap:
        samples = bootstrap_loss_law(N, D, L, law, args.bootstrap, args.seed, args.delta)
        ci = confidence_intervals(samples)
        out["bootstrap"] = {"n": len(samples), "ci95": ci, "samples": samples.tolist()}
        for name in PARAM_NAMES:
            lo, hi = ci[name]
            print(f"  {name:<6} {getattr(law, name):.4g}   95% CI [{lo:.4g}, {hi:.4g}]")
    fc, fl = compute_frontier(C, L)
    compute_law = None
    if len(fl) >= 3:
        compute_law = fit_compute_law(fc, fl, args.delta)
        out["compute_law"] = {k: float(v) for k, v in compute_law.__dict__.items()}
        print(f"L(C)    = {compute_law.E:.4g} + {compute_law.K:.4g} C^-{compute_law.gamma:.4f}"
              f"   ({len(fl)} frontier points)")
    else:
        print(f"L(C) not fitted: {len(fl)} frontier point(s), need 3")
    plots = plot_fits(N, D, C, L, law, compute_law, args.plots or sweep)
    path = sweep / FIT
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}, " + ", ".join(str(p) for p in plots))
    return 0


def cmd_predict(args) -> int:
    if not Path(args.fit).is_file():
        raise FileNotFoundError(f"{args.fit} does not exist; 'scaling_sweep.py fit SWEEP_DIR' writes "
                                f"SWEEP_DIR/fit.json")
    fit = json.loads(Path(args.fit).read_text())
    missing = [k for k in ("law", "flops", "tokens_per_image", "base_model") if k not in fit]
    if missing:
        raise ValueError(f"{args.fit} is not a fit.json written by 'scaling_sweep.py fit' (no "
                         f"{', '.join(missing)}); run fit on the sweep first")
    law = LossLaw(**fit["law"])
    k, c0 = flops_model(fit)
    cl = fit.get("compute_law")
    base = ModelConfig(**fit["base_model"])
    for C in args.compute:
        n, d = compute_optimal(law, C, k, c0)
        print(f"C = {C:.3g} FLOPs ({fit['flops']}): N_opt = {n:.4g} trunk params, D_opt = {d:.4g} images"
              f" ({d * fit['tokens_per_image']:.4g} tokens), L = {float(law(n, d)):.4f}")
        if "bootstrap" in fit:
            opts = [compute_optimal(LossLaw(*s), C, k, c0) for s in fit["bootstrap"]["samples"]]
            ns, ds = np.array(opts).T
            print(f"    95% CI  N_opt [{np.percentile(ns, 2.5):.4g}, {np.percentile(ns, 97.5):.4g}]"
                  f"  D_opt [{np.percentile(ds, 2.5):.4g}, {np.percentile(ds, 97.5):.4g}]")
        if cl:
            print(f"    L(C) law: {float(ComputeLaw(**cl)(C)):.4f}")
        if args.presets:
            for name in ("aim-600M", "aim-1B", "aim-3B", "aim-7B"):
                m = ModelConfig(**{**base.__dict__, **PRESETS[name], "preset": name})
                np_ = trunk_params(m)
                d_p = C / train_flops_per_image(m, fit["flops"])   # the exact count per preset
                print(f"    {name:<9} N = {np_:.4g}: D = {d_p:.4g} images, L = {float(law(np_, d_p)):.4f}")
    return 0


def main(argv=None) -> int:
    ap = cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="write one resolved config.yaml per run")
    p.add_argument("spec", help="sweep grid YAML (examples/sweeps/)")
    p.add_argument("--out", required=True, help="sweep directory (a sub-directory per run)")
    p.add_argument("--force", action="store_true", help="overwrite run configs that changed")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("launch", help="run the sweep locally or write a Slurm job array")
    p.add_argument("sweep_dir")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--local", action="store_true", help="run incomplete runs one after another")
    mode.add_argument("--slurm", action="store_true", help="write sweep.sbatch (a job array)")
    p.add_argument("--trainer", default="aim_megatron.train",
                   help="trainer module, or a script path ending in .py (default aim_megatron.train)")
    p.add_argument("--nproc", type=int, default=1, help="--local: processes per run (torchrun)")
    p.add_argument("--jobs", type=int, default=1,
                   help="--local: runs at once (default 1). For CPU sweeps: with OMP_NUM_THREADS=1, "
                        "one per core. Every run sees every GPU, so on GPUs keep 1")
    p.add_argument("--keep-going", action="store_true", help="--local: continue after a failed run")
    p.add_argument("--dry-run", action="store_true", help="--local: print the commands only")
    p.add_argument("--nodes", type=int, help="--slurm: nodes per run (default: from world_size)")
    p.add_argument("--gpus-per-node", type=int,
                   help="--slurm: default min(world_size, 8) of the sweep spec; 0: CPU nodes "
                        "(no GPU request, world_size / nodes CPU workers per node)")
    p.add_argument("--time", default="04:00:00", help="--slurm: time limit per array task")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--max-parallel", type=int, help="--slurm: array tasks running at once")
    p.add_argument("--sbatch-arg", action="append", default=[],
                   help="--slurm: extra #SBATCH line, e.g. --sbatch-arg=--qos=high (repeatable)")
    p.add_argument("--fit-arg", action="append", default=[],
                   help="--slurm: an option of the fit that the last array task to finish runs, "
                        "e.g. --fit-arg=--intermediate (repeatable)")
    p.add_argument("--submit", action="store_true", help="--slurm: also run sbatch")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("collect", help="gather final and intermediate losses into results.json/csv")
    p.add_argument("sweep_dir")
    p.set_defaults(func=cmd_collect)

    for name, func, text in (
            ("fit", cmd_fit, "fit L(N, D) and L(C); write fit.json, fit.png, residuals.png"),
            ("finish", cmd_finish, "collect; once every run is complete, also fit (what each Slurm "
                                   "array task runs when its run is done)")):
        p = sub.add_parser(name, help=text)
        p.set_defaults(func=func)
        p.add_argument("sweep_dir")
        p.add_argument("--metric", choices=["val_loss", "loss"], default="val_loss",
                       help="final val loss, or the mean of the last 5 logged train losses")
        p.add_argument("--intermediate", action="store_true",
                       help="also fit every intermediate val loss (biased under a cosine schedule)")
        p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (0: none)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--delta", type=float, default=1e-3, help="Huber delta on log-loss")
        p.add_argument("--plots", help="directory for the PNGs (default: the sweep directory)")

    p = sub.add_parser("predict", help="compute-optimal N, D and loss for FLOPs budgets")
    p.add_argument("fit", help="fit.json written by 'fit'")
    p.add_argument("--compute", type=float, nargs="+", required=True, help="training FLOPs budgets")
    p.add_argument("--presets", action="store_true", help="also show the loss of each AIM preset")
    p.set_defaults(func=cmd_predict)

    args = ap.parse_args(argv)
    if getattr(args, "fit_arg", None):   # a bad fit option fails now, not after the whole sweep
        ap.parse_args(["finish", args.sweep_dir, *args.fit_arg])
    for name in ("nproc", "jobs", "nodes", "gpus_per_node", "max_parallel"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "gpus_per_node" else 1):
            ap.error(f"--{name.replace('_', '-')} {value}: must be >= 1")
    if getattr(args, "bootstrap", 0) < 0:
        ap.error(f"--bootstrap {args.bootstrap}: must be >= 0 (0 turns it off)")
    if any(c <= 0 for c in getattr(args, "compute", None) or []):
        ap.error(f"--compute {args.compute}: FLOP budgets must be > 0, e.g. --compute 1e21")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {cli.one_line(exc)}", file=sys.stderr)
        return 1
    except yaml.YAMLError as exc:  # a sweep spec with a syntax error
        print(f"error: {args.spec if args.command == 'plan' else 'a YAML file'} is not valid YAML "
              f"({yaml_problem(exc)}); fix that line", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
