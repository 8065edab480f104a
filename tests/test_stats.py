"""Streamed feature statistics equal a direct computation on the full matrix; 2 ranks equal 1 rank."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO, clean_env
from qpm_dist.stats.accumulate import FeatureSums, locality
from qpm_dist.stats.constants import B_SCALE, clip_scale, compute_A, compute_B, compute_R


def reference_A(X: np.ndarray, y: np.ndarray, C: int) -> np.ndarray:
    """The reference's per-class loop: Pearson correlation of every feature with each class indicator."""
    A = np.zeros((X.shape[1], C))
    Xc = X - X.mean(0)
    sx = X.std(0)
    for c in range(C):
        ind = (y == c).astype(np.float64)
        ic = ind - ind.mean()
        A[:, c] = (Xc * ic[:, None]).mean(0) / (sx * ind.std())
    return A / np.abs(A).max()


def streamed(X: np.ndarray, y: np.ndarray, C: int, batch: int = 37, maps=None) -> FeatureSums:
    sums = FeatureSums.zeros(X.shape[1], C)
    for i in range(0, len(X), batch):
        sums.update(torch.from_numpy(X[i:i + batch]).float(), torch.from_numpy(y[i:i + batch]),
                    None if maps is None else torch.from_numpy(maps[i:i + batch]))
    return sums


@pytest.fixture
def features():
    rng = np.random.default_rng(0)
    N, F, C = 1000, 24, 7
    y = rng.integers(0, C, N)
    prototypes = rng.gamma(2.0, 1.0, size=(C, F))
    X = np.maximum(prototypes[y] + rng.normal(0, 0.8, size=(N, F)), 0).astype(np.float32)  # post-ReLU-like
    return X, y, C


def test_moments_A_and_R_equal_the_full_matrix_computation(features):
    X, y, C = features
    sums = streamed(X, y, C)
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(sums.mean.numpy(), X64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sums.std.numpy(), X64.std(0), rtol=1e-6)
    np.testing.assert_allclose(sums.min.numpy(), X64.min(0))
    np.testing.assert_allclose(sums.class_counts.numpy(), np.bincount(y, minlength=C))
    A = compute_A(sums)
    np.testing.assert_allclose(A, reference_A(X64, y, C), rtol=1e-6, atol=1e-9)
    A_rows = A / np.linalg.norm(A, axis=1, keepdims=True)
    np.testing.assert_allclose(compute_R(A), A_rows @ A_rows.T / np.abs(A_rows @ A_rows.T).max(), rtol=1e-6,
                               atol=1e-12)


def test_zero_variance_feature_gives_zero_A_not_nan(features):
    X, y, C = features
    X = X.copy()
    X[:, 3] = 2.5  # a dead (constant) feature: the reference divided by zero (spec bug 15)
    A = compute_A(streamed(X, y, C))
    assert np.isfinite(A).all()
    assert np.all(A[3] == 0)
    assert np.abs(A).max() == pytest.approx(1.0)


def test_locality_by_hand():
    maps = torch.zeros(1, 3, 3, 4)
    maps[0, 0, 1, 2] = 5.0  # interior peak
    maps[0, 1, 0, 1] = 5.0  # peak on the top row
    maps[0, 2, 1, 3] = 5.0  # peak on the last column of a non-square map
    peak, edge = locality(maps)
    expected_peak = np.exp(5) / (np.exp(5) + 11)
    np.testing.assert_allclose(peak.numpy(), [[expected_peak] * 3], rtol=1e-6)
    assert edge.tolist() == [[0.0, 1.0, 1.0]]


def test_locality_sums_weight_by_feature_share():
    X = np.array([[1.0, 3.0]], dtype=np.float32)  # shares 1/4 and 3/4
    maps = np.zeros((1, 2, 2, 2), dtype=np.float32)
    maps[0, 1, 0, 0] = 1.0
    sums = streamed(X, np.array([0]), 2, maps=maps)
    uniform = 0.25
    peak1 = np.e / (np.e + 3)
    np.testing.assert_allclose(sums.peak_sum.numpy(), [0.25 * uniform, 0.75 * peak1], rtol=1e-6)
    np.testing.assert_allclose(sums.edge_sum.numpy(), [0.25, 0.75], rtol=1e-6)  # every cell of a 2x2 map is border


def test_clip_scale_keeps_sides_and_scales():
    rng = np.random.default_rng(1)
    v = np.concatenate([rng.normal(0.5, 0.01, 200), [-3.0, 40.0]])  # cluster around +0.5, one outlier each side
    out = clip_scale(v)
    assert np.abs(out).max() == pytest.approx(B_SCALE)
    assert out.mean() == pytest.approx(0.0, abs=1e-12)
    # the negative outlier is clipped to the cluster's lower bound (about 0.47): it stays the smallest value
    # and does not jump to +|lo| as in the reference (spec bug 10)
    assert out[-2] == out.min()
    assert out[-1] == out.max()
    # both outliers now sit on the cluster's bounds: no value lies outside the cluster's (scaled) range
    cluster = out[:200]
    assert out[-2] == pytest.approx(cluster.min()) and out[-1] == pytest.approx(cluster.max())


def test_B_prefers_peaked_interior_features():
    rng = np.random.default_rng(0)
    N, F = 64, 6
    X = np.ones((N, F), dtype=np.float32)
    maps = rng.normal(0, 0.05, size=(N, F, 6, 6)).astype(np.float32)
    maps[:, 0, 2, 3] += 6.0  # peaked, interior
    maps[:, 1, 0, 0] += 6.0  # peaked, on the border
    sums = streamed(X, np.zeros(N, dtype=np.int64), 1, maps=maps)
    B = compute_B(sums)
    assert B[0] == B.max()
    assert B[1] == B.min()  # border-focused features get the worst score


def test_two_ranks_equal_one_rank(tiny_data, tmp_path):
    script = str(REPO / "tests" / "scripts" / "stats_pass.py")
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    for cmd in ([sys.executable, script, str(tiny_data), str(one)],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script,
                 str(tiny_data), str(two)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = FeatureSums.load(one), FeatureSums.load(two)
    assert float(a.count) == float(b.count) == 128
    for name in ("sum", "sumsq", "min", "max", "class_sums", "class_counts", "peak_sum", "edge_sum"):
        np.testing.assert_allclose(getattr(a, name).numpy(), getattr(b, name).numpy(), rtol=1e-9, err_msg=name)
