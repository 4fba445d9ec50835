"""A run's training and validation loss (and lr) from its metrics.jsonl, plotted to a PNG: the
``aim-plot-metrics`` command (tools/plot_metrics.py).

    aim-plot-metrics runs/demo [--out runs/demo/loss_curve.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aim_megatron.scaling.collect import read_metrics as read_records, record_kind


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, val records), last record per step (a resumed run re-logs steps)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} an aim-pretrain train.output_dir?")
    records, _ = read_records(path)
    return ([r for r in records if record_kind(r) == "train"],
            [r for r in records if record_kind(r) == "val"])


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(run_dir)
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                    gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_ylabel("normalized-pixel MSE (non-prefix patches)")
    ax.set_title(f"AIM pre-training: {Path(run_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    try:
        out = plot(args.run_dir, args.out or args.run_dir / "loss_curve.png")
    except FileNotFoundError as exc:
        print(f"plot_metrics: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0

