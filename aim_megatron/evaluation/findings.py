"""The AIM paper's main findings, reproduced in direction at CPU scale on Fashion-MNIST.

    python tools/findings.py run    [--only base,causal,...] [--seeds 3] [--steps 400] [--jobs 1]
    python tools/findings.py report                      # tables + PNGs -> docs/findings.md
    python tools/findings.py all                         # run, then report (make findings)

Every variant is the base (the demo model, examples/configs/aim_fmnist_demo.yaml or --config,
with 7x7-pixel patches: BASE_SET) changed in one thing, pre-trained for --steps steps from --seeds
seeds, and probed with the attentive probe (aim-probe) on the same seeded split. The findings (El-Nouby et al. 2024) and the variants each
one compares:

  1. validation loss vs probe top-1, over checkpoints and sizes   small, base, large (every checkpoint)
  2. prefix-causal vs plain causal pre-training (both probed bidirectionally)   base vs causal
  3. normalized-pixel vs raw-pixel targets                         base vs raw
  4. MLP head vs a linear head                                     base vs linear_head
  5. a larger trunk: lower loss and a higher probe                 small < base < large

Runs live in --out/<variant>/seed<k>/ (a finished run, probe included, is not run again, so an
interrupted run continues where it stopped); ``report`` reads whatever is there, says which runs
are missing, and writes docs/findings.md and docs/img/findings_*.png.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from aim_megatron.scaling.collect import read_metrics

ROOT = Path(__file__).resolve().parents[2]   # the repository: default paths, and where runs start

# The findings' base: the demo model with 7x7-pixel patches (16 tokens instead of 49), 2.5x less CPU
# per step, so 6 variants x 3 seeds fit in about two hours on 2 cores; --set model.patch_size=4
# runs them on the demo model itself. Probes use 16 heads, as the demo's (docs/probe.md). fp32, as
# docs/findings.md was measured (the demo itself now trains in bf16, 2x faster on CPU).
BASE_SET = ["model.patch_size=7", "train.params_dtype=fp32"]
BASE_PROBE_SET = ["probe.num_heads=16"]

# One change each against the base.
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "causal": ["model.prefix_min=0", "model.prefix_max=0"],
    "raw": ["model.target_norm=false"],
    "linear_head": ["model.head_type=linear"],
    "small": ["model.hidden_size=64", "model.num_heads=2"],
    "large": ["model.hidden_size=192", "model.num_heads=6"],
}
SIZE_VARIANTS = ("small", "base", "large")   # finding 1 probes every checkpoint of these
FINDINGS = [  # (number, title, variant the paper prefers, other variant, what the paper reports)
    (2, "prefix-causal vs plain causal pre-training", "base", "causal",
     "prefix-causal pre-training gives a better bidirectional probe (paper Table 4)"),
    (3, "normalized-pixel vs raw-pixel targets", "base", "raw",
     "per-patch normalized targets give a better probe (paper Table 3)"),
    (4, "MLP head vs a linear head", "base", "linear_head",
     "the MLP prediction head gives a better probe (paper Table 5)"),
]


# --------------------------------------------------------------------------- running

def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / variant / f"seed{seed}"


def checkpoint_steps(run: Path) -> list[int]:
    ckpts = run / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in ckpts.glob("step_*") if p.is_dir()) if ckpts.is_dir() else []


def pretrain_done(run: Path) -> bool:
    records, _ = read_metrics(run / "metrics.jsonl")
    return any(r.get("event") == "complete" for r in records)


def _call(cmd: list[str], log: Path, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log}")


def run_one(args, variant: str, seed: int) -> Path:
    """Pre-train one variant from one seed (unless done), then probe its checkpoints (unless done)."""
    run = run_dir(args.out, variant, seed)
    log = run / "findings.log"
    every = max(1, args.steps // args.checkpoints)
    if not pretrain_done(run):
        _call([sys.executable, "-m", "aim_megatron.train", "--config", str(args.config),
               f"train.output_dir={run}", f"train.seed={seed}", f"train.train_iters={args.steps}",
               f"train.save_interval={every}", f"train.eval_interval={every}", "train.keep_last=0",
               "train.tensorboard=false", f"data.train_sources=[{args.data}/train]",
               f"data.val_sources=[{args.data}/test]", *BASE_SET, *args.set, *VARIANTS[variant]], log, args.threads)
    steps = checkpoint_steps(run)
    if variant not in SIZE_VARIANTS:
        steps = steps[-1:]
    for step in steps:
        out = run / "probe" / f"step_{step:08d}"
        if (out / "metrics.json").is_file():
            continue
        _call([sys.executable, "-m", "aim_megatron.probe", "--checkpoint", str(run / "checkpoints" / f"step_{step:08d}"),
               "--data", str(args.data), "--train-samples", str(args.probe_train),
               *([] if args.probe_test is None else ["--test-samples", str(args.probe_test)]),
               "--out", str(out), f"probe.seed={seed}", *BASE_PROBE_SET, *args.probe_set], log, args.threads)
    return run


def cmd_run(args) -> int:
    only = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [v for v in only if v not in VARIANTS]
    if unknown:
        print(f"findings: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 1
    for split in ("train", "test"):
        if not (args.data / split / "manifest.json").is_file():
            print(f"findings: no shards in {args.data}/{split}; build them with "
                  f"tools/make_shards.py --fashion-mnist {split} --out {args.data}/{split}", file=sys.stderr)
            return 1
    jobs = [(v, s) for s in range(args.seeds) for v in only]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, args, v, s): (v, s) for v, s in jobs}
        for fut in concurrent.futures.as_completed(futures):
            v, s = futures[fut]
            fut.result()
            print(f"findings: {v} seed {s} done ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    return 0


# --------------------------------------------------------------------------- collecting

def collect(out: Path) -> dict:
    """{variant: {seed: {"val": {step: loss}, "probe": {step: top1}, "seconds": s, "images_per_s": x}}}"""
    results: dict = {}
    for vdir in sorted(p for p in out.glob("*") if p.is_dir() and p.name in VARIANTS):
        for sdir in sorted(vdir.glob("seed*")):
            records, _ = read_metrics(sdir / "metrics.jsonl")
            if not any(r.get("event") == "complete" for r in records):
                continue
            val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
            ips = [r["images_per_s"] for r in records if "images_per_s" in r]
            probe = {}
            for p in sorted((sdir / "probe").glob("step_*/metrics.json")):
                probe[int(p.parent.name.split("_")[1])] = json.loads(p.read_text())["top1"]
            if probe:
                results.setdefault(vdir.name, {})[int(sdir.name[4:])] = {
                    "val": val, "probe": probe, "images_per_s": sum(ips) / len(ips) if ips else None}
    return results


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan"))


def final(run: dict, key: str) -> float:
    d = run[key]
    return d[max(d)]


def pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


# Two-sided 95% critical values of Student's t for 1-10 degrees of freedom: with 3 seeds a mean
# difference must be 4.3 standard errors from 0, not 2, before it says more than noise.
T_CRITICAL_95 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23]


def verdict(diffs: list[float]) -> str:
    """Paired differences (preferred - other, per seed) against the paper's direction (> 0), with a
    paired t-test at 95%."""
    m, s = mean_std(diffs)
    side = "same direction as the paper" if m > 0 else "opposite to the paper"
    if len(diffs) < 2 or math.isnan(s):
        return side + " (one seed: no spread)"
    t = m / (s / math.sqrt(len(diffs))) if s > 0 else math.copysign(math.inf, m)
    crit = T_CRITICAL_95[len(diffs) - 2] if len(diffs) - 1 <= len(T_CRITICAL_95) else 1.96
    if t > crit:
        return f"agrees with the paper (paired t = {t:.1f} > {crit}, 95%)"
    if t < -crit:
        return f"DISAGREES with the paper (paired t = {t:.1f} < -{crit}, 95%)"
    return f"{side}, not significant (paired t = {t:.1f}; 95% needs |t| > {crit} with {len(diffs)} seeds)"


# --------------------------------------------------------------------------- report

def _pct(m: float, s: float) -> str:
    return f"{100 * m:.1f}%" + ("" if math.isnan(s) else f" ± {100 * s:.1f}")


def _points(m: float, s: float) -> str:
    return f"{100 * m:+.1f}" + ("" if math.isnan(s) else f" ± {100 * s:.1f}") + " points"


def _loss(m: float, s: float) -> str:
    return f"{m:.4f}" + ("" if math.isnan(s) else f" ± {s:.4f}")


def report(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = collect(args.out)
    if not res:
        print(f"findings: no finished runs under {args.out}; run `python tools/findings.py run` first", file=sys.stderr)
        return 1
    img = args.doc.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(img, args.doc.parent)
    shown_out = os.path.relpath(args.out, ROOT) if args.out.is_absolute() else str(args.out)
    lines = ["# The AIM paper's findings at CPU scale (Fashion-MNIST)", "",
             f"Generated by `python tools/findings.py report` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC "
             f"from the runs in `{shown_out}`. Mean ± standard deviation over seeds; top-1 of the attentive "
             f"probe on frozen features (bidirectional attention). The base is the demo model "
             f"(examples/configs/aim_fmnist_demo.yaml) with {' '.join(BASE_SET)}; probes add "
             f"{' '.join(BASE_PROBE_SET)}. What each run was:", "",
             "| variant | seeds | steps | images/s (pre-training, shared 2-core machine) | change against the base |",
             "|---|---|---|---|---|"]
    settings = {}
    for v, runs in res.items():
        any_run = run_dir(args.out, v, next(iter(runs)))
        cfg_file = any_run / "config.yaml"
        if cfg_file.is_file():
            import yaml
            settings[v] = yaml.safe_load(cfg_file.read_text())
        steps = max(max(r["val"] or {0: 0}) for r in runs.values())
        ips = [r["images_per_s"] for r in runs.values() if r["images_per_s"]]
        lines.append(f"| {v} | {len(runs)} | {steps} | {sum(ips) / len(ips):.0f} | "
                     f"{' '.join(VARIANTS[v]) or '(none)'} |"
                     if ips else f"| {v} | {len(runs)} | {steps} | | {' '.join(VARIANTS[v])} |")
    missing = [v for v in VARIANTS if v not in res]
    any_probe = next(iter(next(iter(res.values())).values()))
    probe_file = next(run_dir(args.out, *next((v, s) for v in res for s in res[v])).glob("probe/step_*/metrics.json"))
    pm = json.loads(probe_file.read_text())
    lines += ["", f"Probe split: {pm['num_train']} training images (seeded subset), {pm['num_test']} test images; "
              f"layers {pm['layers']}; probe recipe {json.dumps({k: pm['probe_config'].get(k) for k in ('num_heads', 'epochs', 'lr', 'weight_decay', 'batch_size')})} "
              f"(num_heads null = the trunk's)."]
    if missing:
        lines += ["", f"**Not run** (no finished run with a probe): {', '.join(missing)}. Run them with "
                  f"`python tools/findings.py run --only {','.join(missing)} --seeds {args.seeds} --steps {args.steps} "
                  f"--out {shown_out}` (plus the probe options of the runs above) then "
                  f"`python tools/findings.py report --out {shown_out}`."]
    del any_probe

    # Finding 1: loss vs probe over checkpoints and sizes.
    pts = [(v, s, step, r["val"][step], r["probe"][step]) for v in SIZE_VARIANTS if v in res
           for s, r in res[v].items() for step in r["probe"] if step in r["val"]]
    lines += ["", "## 1. Validation loss vs probe top-1 (checkpoints and model sizes)", "",
              "Paper: the pre-training objective (validation loss) and the downstream probe are strongly "
              "correlated, across checkpoints and model sizes (lower loss, higher top-1)."]
    if len(pts) >= 3:
        x, y = [p[3] for p in pts], [p[4] for p in pts]
        r_p, r_s = pearson(x, y), pearson(ranks(x), ranks(y))
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for v, c in zip(SIZE_VARIANTS, ("tab:blue", "tab:orange", "tab:green")):
            sel = [p for p in pts if p[0] == v]
            if sel:
                ax.scatter([p[3] for p in sel], [100 * p[4] for p in sel], c=c, label=v)
        ax.set(xlabel="validation loss (normalized-pixel MSE)", ylabel="attentive probe top-1 (%)",
               title=f"Pearson r = {r_p:.2f}, Spearman = {r_s:.2f}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(img / "findings_loss_vs_probe.png", dpi=120)
        plt.close(fig)
        lines += ["", f"{len(pts)} checkpoints: Pearson r = **{r_p:.2f}**, Spearman rank correlation = "
                  f"**{r_s:.2f}** between validation loss and top-1 (the paper's direction is negative). "
                  + ("Agrees with the paper." if r_s < -0.5 else "Does not show the paper's strong correlation."),
                  "", f"![loss vs probe]({rel}/findings_loss_vs_probe.png)", "",
                  "| variant | seed | step | validation loss | top-1 |", "|---|---|---|---|---|"]
        lines += [f"| {v} | {s} | {step} | {vl:.4f} | {100 * t:.1f}% |" for v, s, step, vl, t in pts]
    else:
        lines += ["", "Not enough checkpoints probed yet (needs the small/base/large runs)."]

    # Findings 2-4: paired ablations.
    bars = []
    for num, title, pref, other, claim in FINDINGS:
        lines += ["", f"## {num}. {title[0].upper()}{title[1:]}", "", f"Paper: {claim}."]
        if pref not in res or other not in res:
            lines += ["", f"Not run: needs `{pref}` and `{other}`."]
            continue
        seeds = sorted(set(res[pref]) & set(res[other]))
        a = [final(res[pref][s], "probe") for s in seeds]
        b = [final(res[other][s], "probe") for s in seeds]
        la = [final(res[pref][s], "val") for s in seeds]
        lb = [final(res[other][s], "val") for s in seeds]
        diffs = [x - y for x, y in zip(a, b)]
        bars.append((f"{num}: {pref} vs {other}", mean_std(a), mean_std(b), pref, other))
        lines += ["", "| variant | top-1 | final validation loss (its own objective) |", "|---|---|---|",
                  f"| {pref} | {_pct(*mean_std(a))} | {_loss(*mean_std(la))} |",
                  f"| {other} | {_pct(*mean_std(b))} | {_loss(*mean_std(lb))} |",
                  "", f"{len(seeds)} paired seed(s); {pref} - {other} = {_points(*mean_std(diffs))}: "
                  f"**{verdict(diffs)}**."]
        if other in ("raw", "causal", "linear_head"):
            lines += ["", "The validation losses are not comparable across these two (another target, "
                      "mask or head); only the probe is."]
    if bars:
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for i, (label, (ma, sa), (mb, sb), pref, other) in enumerate(bars):
            ax.bar(3 * i, 100 * ma, yerr=None if math.isnan(sa) else 100 * sa, color="tab:blue",
                   label="paper's preferred" if i == 0 else None)
            ax.bar(3 * i + 1, 100 * mb, yerr=None if math.isnan(sb) else 100 * sb, color="tab:gray",
                   label="ablation" if i == 0 else None)
            ax.text(3 * i, 100 * ma, pref, ha="center", va="bottom", fontsize=7, rotation=90)
            ax.text(3 * i + 1, 100 * mb, other, ha="center", va="bottom", fontsize=7, rotation=90)
        lo = min(min(b[1][0], b[2][0]) for b in bars)
        ax.set(xticks=[3 * i + 0.5 for i in range(len(bars))], xticklabels=[b[0].split(":")[0] for b in bars],
               ylabel="attentive probe top-1 (%)", ylim=(100 * lo - 5, None), xlabel="finding")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(img / "findings_ablations.png", dpi=120)
        plt.close(fig)
        lines += ["", f"![ablations]({rel}/findings_ablations.png)"]

    # Finding 5: size.
    lines += ["", "## 5. A larger trunk: lower loss, higher probe", "",
              "Paper: loss and probe both improve with trunk size (0.6B -> 7B).", ""]
    sizes = [v for v in SIZE_VARIANTS if v in res]
    if len(sizes) >= 2:
        lines += ["| trunk | width | seeds | final validation loss | top-1 |", "|---|---|---|---|---|"]
        rows = []
        for v in sizes:
            width = (settings.get(v) or {}).get("model", {}).get("hidden_size", "?")
            ls = mean_std([final(r, "val") for r in res[v].values()])
            ts = mean_std([final(r, "probe") for r in res[v].values()])
            rows.append((v, width, ls, ts))
            lines.append(f"| {v} | {width} | {len(res[v])} | {_loss(*ls)} | {_pct(*ts)} |")
        loss_down = all(rows[i][2][0] > rows[i + 1][2][0] for i in range(len(rows) - 1))
        top_up = all(rows[i][3][0] < rows[i + 1][3][0] for i in range(len(rows) - 1))
        lines += ["", f"Loss falls with width: **{'yes' if loss_down else 'no'}**; probe rises with width: "
                  f"**{'yes' if top_up else 'no'}** (means; compare the spreads above)."]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
        xs = list(range(len(rows)))
        a1.errorbar(xs, [r[2][0] for r in rows], yerr=[0 if math.isnan(r[2][1]) else r[2][1] for r in rows], marker="o")
        a2.errorbar(xs, [100 * r[3][0] for r in rows], yerr=[0 if math.isnan(r[3][1]) else 100 * r[3][1] for r in rows], marker="o")
        for a, t in ((a1, "validation loss"), (a2, "probe top-1 (%)")):
            a.set(xticks=xs, xticklabels=[f"{r[0]} ({r[1]})" for r in rows], title=t)
        fig.tight_layout()
        fig.savefig(img / "findings_size.png", dpi=120)
        plt.close(fig)
        lines += ["", f"![size]({rel}/findings_size.png)"]
    else:
        lines += ["Not run: needs at least two of small/base/large."]
    if args.notes and Path(args.notes).is_file():
        lines += ["", Path(args.notes).read_text().rstrip()]
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text("\n".join(lines) + "\n")
    print(f"findings: wrote {args.doc} and {img}/findings_*.png from {sum(len(r) for r in res.values())} runs")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "report", "all"])
    ap.add_argument("--only", help=f"comma-separated variants (default all: {','.join(VARIANTS)})")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400, help="pre-training steps per run")
    ap.add_argument("--checkpoints", type=int, default=2, help="checkpoints per run (finding 1 probes each)")
    ap.add_argument("--config", type=Path, default=ROOT / "examples/configs/aim_fmnist_demo.yaml")
    ap.add_argument("--data", type=Path, default=ROOT / "data/fashion-mnist", help="shards with train/ and test/")
    ap.add_argument("--out", type=Path, default=ROOT / "runs/findings")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs/findings.md")
    ap.add_argument("--notes", type=Path, default=ROOT / "docs/findings_notes.md",
                    help="hand-written discussion appended to the report, if the file exists")
    ap.add_argument("--probe-train", type=int, default=10000)
    ap.add_argument("--probe-test", type=int, default=None, help="default: the whole test split")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--threads", type=int, default=2, help="OMP threads per run")
    ap.add_argument("--set", nargs="*", default=[], help=f"extra trainer overrides for every run, after {' '.join(BASE_SET)} (a variant's own change wins)")
    ap.add_argument("--probe-set", nargs="*", default=[], help=f"extra probe.key=value overrides, after {' '.join(BASE_PROBE_SET)}")
    args = ap.parse_args(argv)
    if min(args.seeds, args.steps, args.checkpoints, args.jobs, args.threads, args.probe_train) < 1:
        ap.error("--seeds, --steps, --checkpoints, --jobs, --threads and --probe-train must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command in ("run", "all"):
        rc = cmd_run(args)
        if rc:
            return rc
    if args.command in ("report", "all"):
        return report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
