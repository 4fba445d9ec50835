"""Plots of a sweep's fit: loss vs images per model size with the fitted L(N, D), L(C) with the
compute frontier, and the log-residuals (fit.png, residuals.png).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from aim_megatron.scaling.fit import ComputeLaw, LossLaw, compute_frontier
from aim_megatron.scaling.plan import short_number


def _data_ticks(ax, values: np.ndarray, axis: str = "x") -> None:
    """On a short log axis matplotlib labels minor ticks until they overlap; with a few distinct
    values (a sweep's model or data sizes) label exactly those instead."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    u = np.unique(values)
    if len(u) > 8:
        return
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(FixedLocator(u))
    target.set_major_formatter(lambda v, _pos: short_number(v))
    target.set_minor_locator(NullLocator())
    target.set_minor_formatter(NullFormatter())


def plot_fits(N, D, C, L, law: LossLaw, compute_law: Optional[ComputeLaw], out_dir: str | Path
              ) -> list[Path]:
    """fit.png (loss vs images per model size with the fitted curves; L(C) with the frontier) and
    residuals.png (log-residuals vs N and D, coloured by model size)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    N, D, C, L = (np.asarray(v, float) for v in (N, D, C, L))
    sizes = np.unique(N)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    color_of = {n: c for n, c in zip(sizes, colors)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    d_grid = np.geomspace(D.min() / 2, D.max() * 2, 100)
    for n, col in zip(sizes, colors):
        sel = N == n
        ax.scatter(D[sel], L[sel], color=col, s=18, label=f"N={n:.3g}")
        ax.plot(d_grid, law(n, d_grid), color=col, lw=1)
    lo, hi = L.min(), L.max()
    if law.E > lo / 3:   # a floor near the data: draw it
        ax.axhline(law.E, color="gray", ls=":", lw=1, label=f"E={law.E:.3g}")
        lo = min(lo, law.E)
    else:                # E -> 0 (no floor in range): a line at 1e-300 would flatten the plot
        ax.plot([], [], " ", label=f"E={law.E:.2g} (no floor in range)")
    ax.set_ylim(lo / 1.1, hi * 1.1)
    ax.set(xscale="log", yscale="log", xlabel="images seen D", ylabel="loss",
           title=f"L = E + A/N^{law.alpha:.3f} + B/D^{law.beta:.3f}")
    _data_ticks(ax, D)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.scatter(C, L, s=14, color="tab:gray", label="runs")
    fc, fl = compute_frontier(C, L)
    ax.scatter(fc, fl, s=22, color="tab:red", label="frontier")
    if compute_law is not None:
        c_grid = np.geomspace(C.min() / 2, C.max() * 10, 100)
        ax.plot(c_grid, compute_law(c_grid), color="tab:red",
                label=f"L(C) = {compute_law.E:.3g} + {compute_law.K:.3g} C^-{compute_law.gamma:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="loss", title="L(C)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fit_png = out_dir / "fit.png"
    fig.savefig(fit_png, dpi=110)
    plt.close(fig)

    resid = np.log(L) - np.log(law(N, D))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    point_colors = [color_of[n] for n in N]
    for ax, x, label in ((axes[0], N, "trunk params N"), (axes[1], D, "images seen D")):
        ax.scatter(x, resid, s=14, c=point_colors)
        ax.axhline(0, color="gray", lw=1)
        ax.set(xscale="log", xlabel=label)
        _data_ticks(ax, x)
    axes[0].set_ylabel("log L - log L_fit")
    fig.suptitle(f"residuals (colour: model size): rms {np.sqrt(np.mean(resid ** 2)):.4f}")
    fig.tight_layout()
    res_png = out_dir / "residuals.png"
    fig.savefig(res_png, dpi=110)
    plt.close(fig)
    return [fit_png, res_png]
