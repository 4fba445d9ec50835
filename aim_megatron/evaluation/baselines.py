"""Pixel baselines for the probe: multinomial logistic regression and k-nearest neighbours on raw pixels.

    python -m aim_megatron.evaluation.baselines --data data/fashion-mnist [--train-samples N] \\
        [--test-samples N] [--out DIR]

A learned representation is only worth something if a probe on it beats these. They read exactly
the images the probe reads (``labelled_data.open_labelled``: same sources, same seeded subsets), as raw
pixels in [0, 1], one vector per image. Hyper-parameters (the L2 strength of the regression, k of
k-NN) are chosen on a fixed 10% of the training split held out from fitting, then the model is
refit on the whole training split; the test split is used once. numpy/torch only (no sklearn).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("aim_megatron.baselines")

LOGREG_L2 = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3)   # mean-loss L2 strengths tried on the held-out part, strongest first
KNN_K = (1, 3, 5, 10, 20)
HOLDOUT_FRACTION = 0.1


# --------------------------------------------------------------------------- data

def load_pixels(spec: str, split: str, max_samples: Optional[int] = None, subset_seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [n, H*W*C], int64 labels [n]) of the images ``aim-probe`` reads for ``split``.
    Every image must have the same size (true of Fashion-MNIST and .npz arrays)."""
    from aim_megatron.evaluation.labelled_data import open_labelled
    images = open_labelled(spec, split, cfg=None, max_samples=max_samples, subset_seed=subset_seed)
    xs, ys = [], []
    t0 = time.perf_counter()
    for j in images.indices:
        img, label, name = images.read(int(j))
        if img is None:
            log.warning("%s: skipped corrupt image %s", split, name)
            continue
        xs.append(np.asarray(img, dtype=np.uint8).reshape(-1))
        ys.append(label)
    if len({x.shape for x in xs}) > 1:
        raise ValueError(f"{spec} ({split}): images of different sizes; pixel baselines need one size")
    log.info("%s: %d images of %s read in %.0f s", split, len(ys), spec, time.perf_counter() - t0)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def holdout_split(n: int, fraction: float = HOLDOUT_FRACTION, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, held-out indices): a fixed seeded split of n training samples."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = max(1, int(round(n * fraction)))
    return np.sort(perm[cut:]), np.sort(perm[:cut])


# --------------------------------------------------------------------------- models

def fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 100,
               init: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: minimise mean cross-entropy + l2/2 * |W|^2 (bias not
    penalised) with full-batch L-BFGS, from zeros or from ``init`` (W, b). The objective is
    convex, so the start only changes how fast we get to the one optimum. Returns (W [d, c], b [c]).

    L-BFGS runs on U = W / s, s = min(1, 1/sqrt(l2)), so that the penalty's curvature is at most 1,
    the scale of the bias's (a softmax's curvature is below 1/2). Unscaled, W's curvature (l2) dwarfs
    b's under a strong penalty: the line search takes steps sized for W, b moves by
    almost nothing per step, the float32 loss stops changing and L-BFGS stops with b far from its
    optimum (softmax(b) 1.7 points off the class frequencies at l2 = 1e5, still uniform at 1e6).
    For l2 <= 1, s = 1 and the iterates are exactly those of L-BFGS on W."""
    x = x.float()
    scale = 1.0 if l2 <= 1 else l2 ** -0.5
    w0, b0 = init if init is not None else (torch.zeros(x.shape[1], num_classes), torch.zeros(num_classes))
    u, b = (w0.clone().float() / scale).requires_grad_(), b0.clone().float().requires_grad_()
    opt = torch.optim.LBFGS([u, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ (u * scale) + b, y) + 0.5 * (l2 * scale * scale) * (u * u).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (u * scale).detach(), b.detach()


def logreg_predict(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (x.float() @ w + b).argmax(dim=1)


def knn_neighbours(train_x: torch.Tensor, query_x: torch.Tensor, k: int, chunk: int = 1024,
                   exclude_self: bool = False) -> torch.Tensor:
    """[n_query, k] indices of the k nearest training points in Euclidean distance, nearest
    first. ``exclude_self`` drops exact self-matches (query i == train i)."""
    train_x, query_x = train_x.float(), query_x.float()
    sq = (train_x * train_x).sum(1)
    out = []
    for start in range(0, len(query_x), chunk):
        q = query_x[start:start + chunk]
        # |q - t|^2 = |q|^2 - 2 q.t + |t|^2; |q|^2 is constant per row so it does not change the order
        d = sq[None, :] - 2.0 * q @ train_x.T
        if exclude_self:
            rows = torch.arange(len(q))
            d[rows, rows + start] = float("inf")
        out.append(d.topk(k, dim=1, largest=False).indices)
    return torch.cat(out)


def knn_vote(neighbour_labels: torch.Tensor, k: int, num_classes: int) -> torch.Tensor:
    """Majority class among the first k neighbours; a tie goes to the class of the nearer neighbour."""
    nb = neighbour_labels[:, :k]
    # votes plus a tie-break below one vote: earlier (nearer) neighbours add a little more
    weights = 1.0 + 1e-3 * torch.arange(k, 0, -1, dtype=torch.float64) / k
    votes = torch.zeros(len(nb), num_classes, dtype=torch.float64)
    votes.scatter_add_(1, nb, weights.expand_as(nb).contiguous())
    return votes.argmax(dim=1)


# --------------------------------------------------------------------------- end to end

def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).double().mean())


def run_baselines(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                  l2_grid: Sequence[float] = LOGREG_L2, k_grid: Sequence[int] = KNN_K,
                  num_classes: Optional[int] = None) -> dict:
    """Both baselines on raw uint8 pixels ([n, ...], flattened): hyper-parameters chosen on a held-out 10% of ``train``, then
    refit on all of ``train`` and scored once on ``test``."""
    (xtr, ytr), (xte, yte) = train, test
    c = num_classes or int(max(ytr.max(), yte.max())) + 1
    flat = lambda a: torch.from_numpy(np.asarray(a).reshape(len(a), -1)).float() / 255.0
    xtr_t, xte_t = flat(xtr), flat(xte)
    ytr_t, yte_t = torch.from_numpy(ytr), torch.from_numpy(yte)
    fit, held = holdout_split(len(ytr))
    fit, held = torch.from_numpy(fit), torch.from_numpy(held)
    result: dict = {"num_train": len(ytr), "num_test": len(yte), "num_classes": c,
                    "holdout_fraction": HOLDOUT_FRACTION}

    # Logistic regression on standardized pixels (the mean and std of the data it is fitted on).
    t0 = time.perf_counter()
    def standardize(ref, *xs):
        mu, sd = ref.mean(0), ref.std(0).clamp(min=1e-3)
        return [(x - mu) / sd for x in xs]
    x_fit, x_held = standardize(xtr_t[fit], xtr_t[fit], xtr_t[held])
    held_acc, solutions, start = {}, {}, None
    for l2 in sorted(l2_grid, reverse=True):  # strongest first, each warm-starts the next
        start = solutions[l2] = fit_logreg(x_fit, ytr_t[fit], c, l2, init=start)
        held_acc[l2] = accuracy(logreg_predict(x_held, *start), ytr_t[held])
        log.info("logistic regression l2 %g: held-out top-1 %.4f (%.0f s)", l2, held_acc[l2], time.perf_counter() - t0)
    best_l2 = max(l2_grid, key=lambda v: (held_acc[v], v))
    x_all, x_test = standardize(xtr_t, xtr_t, xte_t)
    w, b = fit_logreg(x_all, ytr_t, c, best_l2, init=solutions[best_l2])
    result["logreg"] = {"top1": accuracy(logreg_predict(x_test, w, b), yte_t), "l2": best_l2,
                        "holdout_top1": {str(k): v for k, v in held_acc.items()},
                        "seconds": time.perf_counter() - t0}

    # k-NN in Euclidean distance on the pixels in [0, 1].
    t0 = time.perf_counter()
    kmax = max(k_grid)
    nb_held = ytr_t[fit][knn_neighbours(xtr_t[fit], xtr_t[held], kmax)]
    held_acc = {k: accuracy(knn_vote(nb_held, k, c), ytr_t[held]) for k in k_grid}
    best_k = max(k_grid, key=lambda k: (held_acc[k], -k))
    nb_test = ytr_t[knn_neighbours(xtr_t, xte_t, best_k)]
    result["knn"] = {"top1": accuracy(knn_vote(nb_test, best_k, c), yte_t), "k": best_k,
                     "holdout_top1": {str(k): v for k, v in held_acc.items()},
                     "seconds": time.perf_counter() - t0}
    return result


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="aim-baselines",
                                 description="Logistic regression and k-NN on raw pixels (probe baselines).")
    ap.add_argument("--data", default="fashion-mnist", help="as aim-probe --data")
    ap.add_argument("--train-data", help="labelled source of the training split")
    ap.add_argument("--test-data", help="labelled source of the test split (with --train-data)")
    ap.add_argument("--train-samples", type=int, help="seeded subset of the training split (as aim-probe)")
    ap.add_argument("--test-samples", type=int, help="seeded subset of the test split (as aim-probe)")
    ap.add_argument("--out", type=Path, help="directory for metrics.json")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from aim_megatron.evaluation.labelled_data import data_specs
    try:
        specs = data_specs(args.data, args.train_data, args.test_data)
        train = load_pixels(specs["train"], "train", args.train_samples)
        test = load_pixels(specs["test"], "test", args.test_samples)
    except (FileNotFoundError, ValueError) as exc:
        print(f"aim-baselines: {exc}", file=sys.stderr)
        return 1
    result = run_baselines(train, test)
    result["data"] = specs
    print(f"pixel logistic regression (l2 {result['logreg']['l2']:g}): top-1 {result['logreg']['top1']:.4f}; "
          f"pixel k-NN (k={result['knn']['k']}): top-1 {result['knn']['top1']:.4f} "
          f"on {result['num_test']} test images ({result['num_train']} train)")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
