import numpy as np

from solver_service.synthetic import B_SCALE, clip_scale, correlation_from_stats, realistic_problem


def test_realistic_problem_has_the_reference_value_ranges():
    p = realistic_problem(64, 12, 8, 2, seed=0)
    assert np.abs(p.A).max() == 1.0
    np.testing.assert_allclose(np.diag(p.R), 1.0)
    np.testing.assert_allclose(p.R, p.R.T)
    assert np.abs(p.b).max() <= B_SCALE + 1e-12 and abs(p.b.mean()) < 1e-12


def test_zero_variance_feature_gives_zero_correlation_not_nan():
    """Bug 15: a constant feature would make A NaN in the reference."""
    sums = np.array([[2.0, 3.0], [2.0, 1.0]])       # feature 0 is constant (1.0 per sample)
    counts = np.array([2.0, 2.0])
    total = sums.sum(axis=0)
    total_sq = np.array([4.0, 3.0 ** 2 / 2 + 2.0 ** 2 / 2 + 1.0 ** 2 / 2])
    A = correlation_from_stats(sums, counts, total, total_sq)
    assert np.isfinite(A).all() and np.all(A[0] == 0)


def test_clip_scale_clips_into_the_range_without_flipping_signs():
    """Bug 10: the reference maps v < lo to |lo| sign(v), moving e.g. -5 with lo = 1 to -1 (wrong side)."""
    v = np.concatenate([np.linspace(1.0, 2.0, 100), [-5.0, 50.0]])
    out = clip_scale(v)
    assert out[100] == out.min() and out[101] == out.max()      # outliers stay at their ends
    assert np.abs(out).max() <= B_SCALE + 1e-12
