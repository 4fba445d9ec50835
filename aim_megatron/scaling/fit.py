"""Fitting and predicting with scaling laws: L(N, D) and L(C) from a sweep's losses, compute-optimal N and D.

Fit (Hoffmann et al. 2022, "Chinchilla", approach 3):

    L(N, D) = E + A / N^alpha + B / D^beta,   N = trunk params, D = images seen

fitted as log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e by
minimising a Huber loss (delta 1e-3) of the log-residuals with L-BFGS, started from the best
points of an initialisation grid. Compute is C = D * flops_per_image(N): "6ND" counts
6 * N * tokens per image, "aim" is the explicit count of flops.py (trunk, prediction head and the
attention pairs the prefix-causal mask allows; sizing.train_flops_per_image). Minimising L under
C = k N D gives the closed form

    N_opt = G (C/k)^(beta/(alpha+beta)),  D_opt = (C/k) / N_opt,  G = (alpha A / (beta B))^(1/(alpha+beta)).

A second, model-free law L(C) = E_c + K C^-gamma is fitted to the compute frontier (the running
minimum of loss over increasing compute).
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from aim_megatron.config import ModelConfig
from aim_megatron.scaling.collect import RunResult
from aim_megatron.scaling.sizing import head_train_flops_per_image

FIT = "fit.json"


def fit_points(results: Iterable[RunResult], metric: str = "val_loss", intermediate: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, C, L) of complete runs: their final loss, plus every intermediate val loss (at the
    images seen so far) when ``intermediate``. Intermediate points of a cosine schedule sit above
    the loss a run of that length would reach, so they bias the fit; use them for exploration."""
    rows = []
    for r in results:
        if not r.complete:
            continue
        if metric == "loss":
            if r.final_train_loss is not None:
                rows.append((r.trunk_params, r.images, r.final_train_loss, r.flops_per_image))
            continue
        if r.final_val_loss is None:
            continue
        points = r.curve if intermediate else r.curve[-1:]
        rows += [(r.trunk_params, images, loss, r.flops_per_image) for _, images, loss in points
                 if images > 0]
    if not rows:
        raise ValueError("no complete runs with a loss to fit; run 'collect' and check that runs "
                         "finished and logged val_loss (or use --metric loss)")
    a = np.array(rows, dtype=float)
    return a[:, 0], a[:, 1], a[:, 1] * a[:, 3], a[:, 2]


PARAM_NAMES = ("E", "A", "B", "alpha", "beta")


@dataclass
class LossLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, N, D):
        N, D = np.asarray(N, float), np.asarray(D, float)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def as_array(self) -> np.ndarray:
        return np.array([self.E, self.A, self.B, self.alpha, self.beta])


@dataclass
class ComputeLaw:
    """L(C) = E + K C^-gamma."""
    E: float
    K: float
    gamma: float

    def __call__(self, C):
        return self.E + self.K * np.asarray(C, float) ** -self.gamma


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    return value, np.where(small, r, delta * np.sign(r))


def _lse_objective(theta: np.ndarray, X: np.ndarray, y: np.ndarray, delta: float
                   ) -> tuple[float, np.ndarray]:
    """Mean Huber of LSE(c_j - k_j x_j ..., e) - log L and its gradient.

    theta = (c_1..c_m, e, k_1..k_m) for m log-features X[:, j]; scaled by 1/delta so that
    L-BFGS tolerances do not depend on delta."""
    m = X.shape[1]
    c, e, k = theta[:m], theta[m], theta[m + 1:]
    z = np.concatenate([c[None, :] - X * k[None, :], np.full((len(y), 1), e)], axis=1)
    zmax = z.max(axis=1, keepdims=True)
    w = np.exp(z - zmax)
    s = w.sum(axis=1, keepdims=True)
    lse = (zmax + np.log(s))[:, 0]
    w /= s
    value, dr = _huber(lse - y, delta)
    n = len(y) * delta
    grad = np.concatenate([(dr[:, None] * w[:, :m]).sum(0), [(dr * w[:, m]).sum()],
                           -(dr[:, None] * w[:, :m] * X).sum(0)]) / n
    return float(value.sum() / n), grad


def _grid_objective(thetas: np.ndarray, X: np.ndarray, y: np.ndarray, delta: float) -> np.ndarray:
    """Objective of many theta at once, to rank the initialisation grid."""
    m = X.shape[1]
    c, e, k = thetas[:, :m], thetas[:, m], thetas[:, m + 1:]
    z = c[:, None, :] - X[None, :, :] * k[:, None, :]                  # [G, n, m]
    z = np.concatenate([z, np.broadcast_to(e[:, None, None], z.shape[:2] + (1,))], axis=2)
    lse = np.logaddexp.reduce(z, axis=2)
    return _huber(lse - y[None, :], delta)[0].mean(axis=1)


def _one_blas_thread():
    """L-BFGS-B calls BLAS on 5x5..20x20 matrices; OpenBLAS threads make that 5-10x slower on a
    busy machine. threadpoolctl limits them when installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _fit_lse(X: np.ndarray, y: np.ndarray, grid: np.ndarray, delta: float, n_starts: int,
             extra_starts: Sequence[np.ndarray] = ()) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    starts = list(extra_starts)
    if n_starts > 0:
        order = np.argsort(_grid_objective(grid, X, y, delta))
        starts += [grid[i] for i in order[:n_starts]]
    best, best_value = None, math.inf
    with _one_blas_thread():
        for theta0 in starts:
            res = minimize(_lse_objective, theta0, args=(X, y, delta), jac=True, method="L-BFGS-B",
                           options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-10})
            if res.fun < best_value:
                best, best_value = res.x, float(res.fun)
    return best, best_value


def _grid(*axes: Sequence[float]) -> np.ndarray:
    return np.array(list(itertools.product(*axes)), dtype=float)


# Chinchilla's initialisation grid: a, b in {0, 5, .., 25}, e in {-1, -.5, .., 1},
# alpha, beta in {0, .5, .., 2}.
LOSS_LAW_GRID = _grid(np.arange(0, 26, 5), np.arange(0, 26, 5), np.arange(-1, 1.01, 0.5),
                      np.arange(0, 2.01, 0.5), np.arange(0, 2.01, 0.5))
COMPUTE_LAW_GRID = _grid(np.arange(0, 31, 2.5), np.arange(-2, 1.01, 0.5),
                         [0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0])


def _law_from_theta(t: np.ndarray) -> LossLaw:
    # theta order: (a, b, e, alpha, beta)
    return LossLaw(E=math.exp(t[2]), A=math.exp(t[0]), B=math.exp(t[1]), alpha=t[3], beta=t[4])


def _theta_from_law(law: LossLaw) -> np.ndarray:
    # A fit that finds no floor drives e to -inf and E = e^e underflows to 0: start from e = -690.
    def log(x: float) -> float:
        return math.log(max(x, 1e-300))
    return np.array([log(law.A), log(law.B), log(law.E), law.alpha, law.beta])


def fit_loss_law(N, D, L, delta: float = 1e-3, n_starts: int = 8,
                 init: Optional[LossLaw] = None, grid: np.ndarray = LOSS_LAW_GRID) -> LossLaw:
    """Chinchilla approach 3 fit of L(N, D) (Huber on log-loss, L-BFGS from the best grid points)."""
    N, D, L = (np.asarray(v, float) for v in (N, D, L))
    if len(L) < 5:
        raise ValueError(f"fitting 5 parameters needs at least 5 points, got {len(L)}")
    if len(np.unique(N)) < 2 or len(np.unique(D)) < 2:
        raise ValueError("the fit needs at least 2 model sizes and 2 data sizes")
    X = np.stack([np.log(N), np.log(D)], axis=1)
    extra = [_theta_from_law(init)] if init is not None else []
    theta, _ = _fit_lse(X, np.log(L), grid, delta, n_starts, extra)
    return _law_from_theta(theta)


def bootstrap_loss_law(N, D, L, law: LossLaw, n_boot: int = 200, seed: int = 0,
                       delta: float = 1e-3, n_starts: int = 0) -> np.ndarray:
    """[n_boot, 5] parameter samples (E, A, B, alpha, beta) from refits on points resampled with
    replacement, each started from the full-data fit and the best grid points."""
    N, D, L = (np.asarray(v, float) for v in (N, D, L))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(L), len(L))
        if len(np.unique(N[idx])) < 2 or len(np.unique(D[idx])) < 2:
            continue   # a degenerate resample cannot identify both exponents
        samples.append(fit_loss_law(N[idx], D[idx], L[idx], delta, n_starts, init=law).as_array())
    return np.array(samples)


def confidence_intervals(samples: np.ndarray, level: float = 0.95,
                         names: Sequence[str] = PARAM_NAMES) -> dict[str, tuple[float, float]]:
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return {n: (float(a), float(b)) for n, a, b in zip(names, lo, hi)}


def compute_frontier(C, L) -> tuple[np.ndarray, np.ndarray]:
    """Points that beat every point of lower compute (running minimum of loss over compute)."""
    C, L = np.asarray(C, float), np.asarray(L, float)
    order = np.argsort(C, kind="stable")
    keep, best = [], math.inf
    for i in order:
        if L[i] < best:
            keep.append(i)
            best = L[i]
    return C[keep], L[keep]


def fit_compute_law(C, L, delta: float = 1e-3, n_starts: int = 8) -> ComputeLaw:
    C, L = np.asarray(C, float), np.asarray(L, float)
    if len(L) < 3:
        raise ValueError(f"L(C) has 3 parameters and needs at least 3 frontier points, got {len(L)}")
    theta, _ = _fit_lse(np.log(C)[:, None], np.log(L), COMPUTE_LAW_GRID, delta, n_starts)
    return ComputeLaw(E=math.exp(theta[1]), K=math.exp(theta[0]), gamma=float(theta[2]))


# =========================================================================== predicting

def chinchilla_optimum(law: LossLaw, C: float, flops_per_param_image: float) -> tuple[float, float]:
    """Closed-form compute-optimal (N, D) under C = k N D."""
    a, b = law.alpha, law.beta
    G = (a * law.A / (b * law.B)) ** (1 / (a + b))
    x = C / flops_per_param_image
    n_opt = G * x ** (b / (a + b))
    return n_opt, x / n_opt


def compute_optimal(law: LossLaw, C: float, flops_per_param_image: float,
                    fixed_flops_per_image: float = 0.0) -> tuple[float, float]:
    """Compute-optimal (N, D) under C = D (k N + c0), c0 being per-image cost that does not grow
    with the trunk (the AIM prediction head); found numerically over log N."""
    from scipy.optimize import minimize_scalar

    def loss(log_n: float) -> float:
        n = math.exp(log_n)
        return float(law(n, C / (flops_per_param_image * n + fixed_flops_per_image)))

    hi = math.log(C / flops_per_param_image)   # at least one image
    res = minimize_scalar(loss, bounds=(0.0, hi), method="bounded", options={"xatol": 1e-10})
    n = math.exp(res.x)
    return n, C / (flops_per_param_image * n + fixed_flops_per_image)


def flops_model(manifest: dict[str, Any]) -> tuple[float, float]:
    """(k, c0) with flops per image ~ k N + c0 for the compute-optimal trade-off: k = 6 x tokens
    per trunk parameter; for "aim", c0 = the prediction head's FLOPs per image at the sweep's base
    model (paid per image whatever the trunk). The attention term of "aim" grows with depth x
    width rather than with N and shrinks relative to it as models widen (about 2% of the trunk's
    FLOPs at h = 1536, s = 256), so it is left out of the trade-off; each run's C counts it."""
    s = manifest["tokens_per_image"]
    if manifest["flops"] == "6ND":
        return 6.0 * s, 0.0
    base = ModelConfig(**{k: v for k, v in manifest["base_model"].items()})
    return 6.0 * s, head_train_flops_per_image(base)
