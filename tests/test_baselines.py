"""Pixel baselines (aim_megatron/evaluation/baselines.py) against facts that do not depend on our code."""
import json

import numpy as np
import pytest
import torch

from aim_megatron.evaluation import baselines


def _quadrant_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """8x8 uint8 images with noise; the class is the bright quadrant (4 classes, separable)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.integers(0, 60, (n, 8, 8)).astype(np.uint8)
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, 4 * r:4 * r + 4, 4 * q:4 * q + 4] += 150
    return x, y


def test_logreg_separable_blobs_are_solved():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[6.0, 0.0], [-6.0, 0.0], [0.0, 6.0]])
    y = torch.arange(3).repeat(100)
    x = centres[y] + torch.randn(len(y), 2, generator=g)
    w, b = baselines.fit_logreg(x, y, 3, l2=1e-4)
    assert baselines.accuracy(baselines.logreg_predict(x, w, b), y) == 1.0


@pytest.mark.parametrize("n, dim, l2", [(100, 5, 1e4), (100, 5, 1e5), (100, 5, 1e6), (1000, 50, 1e4)])
def test_logreg_with_huge_penalty_predicts_class_frequencies(n, dim, l2):
    # With W forced to ~0 the optimal (unpenalised) bias satisfies softmax(b) = class frequencies.
    # The stronger the penalty, the stiffer W is against b: unscaled L-BFGS stopped 1.7 points
    # off at l2 = 1e5 (and at 1e4 with 50 features), and left b at zero for 1e6.
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0] * (n // 2) + [1] * (3 * n // 10) + [2] * (n // 5))
    x = torch.randn(len(y), dim, generator=g)
    w, b = baselines.fit_logreg(x, y, 3, l2=l2)
    assert w.abs().max() < 10 / l2     # |W| ~ |x^T (p - y)| / (n l2) at the optimum
    assert torch.allclose(torch.softmax(b, 0), torch.tensor([0.5, 0.3, 0.2]), atol=1e-4, rtol=0)


def test_knn_neighbours_match_sorted_cdist():
    g = torch.Generator().manual_seed(2)
    train, query = torch.rand(300, 7, generator=g), torch.rand(40, 7, generator=g)
    got = baselines.knn_neighbours(train, query, k=5, chunk=16)
    want = torch.cdist(query.double(), train.double()).argsort(dim=1)[:, :5]
    assert torch.equal(got, want)


def test_knn_1_on_its_own_training_points_and_leave_one_out():
    x, y = _quadrant_images(200, 3)
    xt, yt = torch.from_numpy(x.reshape(200, -1)).float(), torch.from_numpy(y)
    assert torch.equal(baselines.knn_vote(yt[baselines.knn_neighbours(xt, xt, 1)], 1, 4), yt)
    nb = baselines.knn_neighbours(xt, xt, 1, exclude_self=True)
    assert not torch.any(nb[:, 0] == torch.arange(200))


def test_knn_vote_majority_and_tie_to_nearest():
    labels = torch.tensor([[2, 1, 1, 0], [0, 1, 2, 3], [3, 3, 1, 1]])
    assert baselines.knn_vote(labels, 3, 4).tolist() == [1, 0, 3]  # majority; all tied -> nearest
    assert baselines.knn_vote(labels, 4, 4).tolist() == [1, 0, 3]  # 2-2 tie -> the nearer class


def test_run_baselines_solves_a_separable_image_task(tmp_path):
    train, test = _quadrant_images(400, 4), _quadrant_images(100, 5)
    r = baselines.run_baselines(train, test)
    assert r["logreg"]["top1"] == 1.0 and r["knn"]["top1"] == 1.0
    assert r["num_train"] == 400 and r["num_test"] == 100 and r["num_classes"] == 4
    assert r["logreg"]["l2"] in baselines.LOGREG_L2 and r["knn"]["k"] in baselines.KNN_K


def test_cli_reads_the_probes_subset_and_writes_metrics(tmp_path):
    (xtr, ytr), (xte, yte) = _quadrant_images(300, 6), _quadrant_images(120, 7)
    npz = tmp_path / "quad.npz"
    np.savez(npz, train_images=xtr, train_labels=ytr, test_images=xte, test_labels=yte)
    # the same seeded subset aim-probe takes
    from aim_megatron.evaluation.labelled_data import open_labelled
    px, py = baselines.load_pixels(str(npz), "train", max_samples=100)
    idx = open_labelled(str(npz), "train", None, max_samples=100).indices
    assert np.array_equal(px, xtr[idx].reshape(100, -1)) and np.array_equal(py, ytr[idx])
    assert baselines.main(["--data", str(npz), "--train-samples", "200", "--out", str(tmp_path / "b")]) == 0
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["num_train"] == 200 and m["num_test"] == 120
    assert m["logreg"]["top1"] == 1.0 and m["knn"]["top1"] == 1.0


def test_cli_missing_data_fails_cleanly(tmp_path, capsys):
    assert baselines.main(["--data", str(tmp_path / "nope.npz")]) == 1
    assert "aim-baselines:" in capsys.readouterr().err
