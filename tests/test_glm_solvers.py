"""The sparse GLM solvers: proximal operators, λ_max, optimality, glm-saga against the fast solver on small
data, and the fast solver on 2 ranks against 1 rank (specs/qsenn_sldd.md §3, §10 acceptance tests)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO, clean_env
from qpm_dist.glm.fast import FastGLM, FastOptions
from qpm_dist.glm.path import fit_path, select_features
from qpm_dist.glm.problem import (class_correlation, lambda_grid, lambda_max, optimal_bias, prox, standardise)
from qpm_dist.glm.saga import SagaGLM, SagaOptions
from qpm_dist.glm.synthetic import synthetic_features


@pytest.fixture(autouse=True)
def one_thread():
    """The solvers' tensors here are tiny: with several intra-op threads on a shared 2-core machine, glm-saga's
    thousands of small minibatch ops run ~10x slower (thread hand-offs), so these tests use one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def problem(n=600, d=40, c=5, seed=0, n_test=200):
    X, y, Xt, yt = synthetic_features(n, d, c, n_test=n_test, seed=seed, noise=0.7)
    X, y, Xt, yt = map(torch.from_numpy, (X, y, Xt, yt))
    mean, std = X.double().mean(0), X.double().std(0, unbiased=False)
    S = torch.zeros(c, d, dtype=torch.float64).index_add_(0, y, X.double())
    counts = torch.bincount(y, minlength=c).double()
    corr = class_correlation(S, counts, mean, std, n)
    return (standardise(X.double(), mean, std).float(), y, standardise(Xt.double(), mean, std).float(), yt,
            corr, counts)


def test_prox_by_hand():
    V = torch.tensor([[3.0, 0.0, -0.5], [-4.0, 0.0, 0.2]])
    # elastic net: soft-threshold by 1, then / (1 + 1)
    torch.testing.assert_close(prox(V, 1.0, 1.0, group=False), torch.tensor([[1.0, 0.0, 0.0], [-1.5, 0.0, 0.0]]))
    # group: column 0 has norm 5 -> scaled by (1 - 1/5) / 2; the all-zero column stays 0 (no 0/0, spec bug 8);
    # column 2 (norm 0.54 < 1) is zeroed
    out = prox(V, 1.0, 1.0, group=True)
    torch.testing.assert_close(out, torch.tensor([[1.2, 0.0, 0.0], [-1.6, 0.0, 0.0]]))
    assert torch.isfinite(out).all()


def test_class_correlation_from_sums_equals_the_direct_product():
    Xs, y, _, _, corr, _ = problem(n=300, d=12, c=4)
    Y = torch.nn.functional.one_hot(y, 4).double()
    direct = Xs.double().T @ (Y - Y.mean(0)) / len(y)
    torch.testing.assert_close(corr, direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group,alpha", [(True, 0.8), (False, 0.99)])
def test_lambda_max_is_the_smallest_all_zero_penalty(group, alpha):
    Xs, y, _, _, corr, counts = problem(n=300, d=12, c=4)
    lam = lambda_max(corr, alpha, group)
    at = FastGLM(Xs, y, 4, len(y), optimal_bias(counts), reduce=False)
    at.solve(lam * 1.0001, alpha, group)
    assert not at.W.any()  # W = 0 stays optimal at λ_max
    below = FastGLM(Xs, y, 4, len(y), optimal_bias(counts), reduce=False)
    below.solve(lam * 0.95, alpha, group)
    assert below.W.any()


@pytest.mark.parametrize("group,alpha", [(True, 0.8), (False, 0.99)])
def test_fast_solution_satisfies_the_optimality_conditions(group, alpha):
    Xs, y, _, _, corr, counts = problem(n=400, d=16, c=4)
    lam = lambda_max(corr, alpha, group) * 0.2
    s = FastGLM(Xs, y, 4, len(y), optimal_bias(counts), FastOptions(tol=1e-6, screening=group), reduce=False)
    s.solve(lam, alpha, group)
    W = s.W.double()
    Z = Xs.double() @ W.T + s.b.double()
    G = (torch.softmax(Z, 1) - torch.nn.functional.one_hot(y, 4).double()).T @ Xs.double() / len(y)
    assert float(G.sum(0).abs().max()) < 1e-4 and float((torch.softmax(Z, 1).mean(0) -  # bias gradient = 0
                                                         torch.bincount(y, minlength=4) / len(y)).abs().max()) < 1e-4
    smooth = G + lam * (1 - alpha) * W
    if group:
        norms = W.norm(dim=0)
        active = norms > 0
        assert active.any() and (~active).any()
        # active column j: g_j + λα w_j/‖w_j‖ = 0; inactive: ‖g_j‖ <= λα
        residual = smooth[:, active] + lam * alpha * W[:, active] / norms[active]
        assert float(residual.abs().max()) < 1e-3
        assert float(G[:, ~active].norm(dim=0).max()) <= lam * alpha * (1 + 1e-3)
    else:
        nz = W != 0
        assert nz.any() and (~nz).any()
        assert float((smooth + lam * alpha * W.sign())[nz].abs().max()) < 1e-3
        assert float(G[~nz].abs().max()) <= lam * alpha * (1 + 1e-3)


def test_glm_saga_path_and_fast_path_agree_on_small_data():
    """Selection (group lasso) and the elastic-net fit with glm-saga and with the fast solver."""
    Xs, y, Xts, yts, corr, counts = problem()
    n, C, k = len(y), 5, 8
    ridge = 1e-3 * lambda_max(corr, 0.8, True)
    chosen = {}
    for name in ("glm_saga", "fast"):
        if name == "fast":
            solver = FastGLM(Xs, y, C, n, optimal_bias(counts), reduce=False)
        else:
            solver = SagaGLM(Xs, y, C, optimal_bias(counts), SagaOptions(lookbehind=3, max_epochs=300))
        order, _ = select_features(solver, k, ridge)
        chosen[name] = order
    overlap = len(set(chosen["glm_saga"]) & set(chosen["fast"]))
    assert overlap >= k - 1, chosen
    cols = torch.tensor(sorted(chosen["fast"]))
    lams_fit = lambda_grid(lambda_max(corr[cols], 0.99, False), 15, 1e-2)
    paths, solvers = {}, {}
    for name, opts in (("glm_saga", SagaOptions(lookbehind=5, max_epochs=300)),  # the reference's settings
                       ("glm_saga_tight", SagaOptions(lookbehind=10, max_epochs=500, tol=1e-6)), ("fast", None)):
        args = (Xs[:, cols].contiguous(), y, C)
        test = (Xts[:, cols].contiguous(), yts)
        solver = (FastGLM(*args, n, optimal_bias(counts), reduce=False, test=test) if name == "fast" else
                  SagaGLM(*args, optimal_bias(counts), opts, test=test))
        paths[name], solvers[name] = fit_path(solver, lams_fit, 0.99), solver
    saga, tight, fast = paths["glm_saga"], paths["glm_saga_tight"], paths["fast"]
    lam = lams_fit[-1]
    objective = {name: s.objective(lam, 0.99, False) for name, s in solvers.items()}
    # the fast solver reaches the optimum: its objective is at most glm-saga's, which the reference's stopping
    # rule leaves a little above it (with stochastic extra non-zeros at small λ)
    assert objective["fast"] <= objective["glm_saga"] + 1e-6
    assert objective["glm_saga_tight"] - 5e-5 <= objective["fast"] <= objective["glm_saga_tight"] + 1e-6
    # glm-saga run to a tight tolerance has the fast solver's sparsity pattern along the whole path
    nnz = lambda path: np.array([p.per_class for p in path])  # noqa: E731
    assert np.abs(nnz(tight) - nnz(fast)).max() <= 0.2 + 1e-9  # at most one entry of 40 differs at any point
    assert abs(saga[-1].test_acc - fast[-1].test_acc) <= 2.0
    rel = np.linalg.norm(tight[-1].weight - fast[-1].weight) / np.linalg.norm(fast[-1].weight)
    assert rel < 0.02


def copies_problem(n=2000, copies=6, seed=0):
    """A noisy marker of class 0 present as 6 near-identical copies (say six channels that learnt the same part),
    and one noisier marker for each of classes 1, 2, 3: features 0-5 are the copies, 6, 7, 8 the others."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    base = (y == 0) + rng.normal(0, 1.0, n)
    columns = [base + rng.normal(0, 0.1, n) for _ in range(copies)]
    columns += [(y == c) + rng.normal(0, 1.5, n) for c in (1, 2, 3)]
    X, y = torch.from_numpy(np.stack(columns, 1).astype(np.float32)), torch.from_numpy(y)
    mean, std = X.double().mean(0), X.double().std(0, unbiased=False)
    S = torch.zeros(4, X.shape[1], dtype=torch.float64).index_add_(0, y, X.double())
    counts = torch.bincount(y, minlength=4).double()
    return standardise(X.double(), mean, std).float(), y, class_correlation(S, counts, mean, std, n), counts


@pytest.mark.parametrize("name", ["fast", "glm_saga"])
def test_selection_takes_one_feature_per_class_not_the_copies(name):
    """Greedy selection, one feature at a time (specs/qsenn_sldd.md §4.4): the copies add nothing once one of
    them is in. The first n features to enter the group-lasso path were four copies (the path takes
    correlated features together), and refining λ between grid points does not change that."""
    X, y, corr, counts = copies_problem()
    solver = (FastGLM(X, y, 4, len(y), optimal_bias(counts), reduce=False) if name == "fast" else
              SagaGLM(X, y, 4, optimal_bias(counts), SagaOptions(lookbehind=3, max_epochs=300)))
    order, records = select_features(solver, 4, 1e-3 * lambda_max(corr, 0.8, True))
    assert sum(j < 6 for j in order) == 1 and {6, 7, 8} <= set(order), order
    assert [r["feature"] for r in records] == order and records[0]["score"] >= records[-1]["score"]


def test_fast_solver_on_two_ranks_equals_one_rank(tmp_path):
    script = str(REPO / "tests" / "scripts" / "glm_fast_path.py")
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    for cmd in ([sys.executable, script, str(one)],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script, str(two)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = np.load(one), np.load(two)
    assert a["selected"].tolist() == b["selected"].tolist()
    assert a["rows"].tolist() == [600] and b["rows"].tolist() == [300, 300]  # each rank fitted half the rows
    np.testing.assert_allclose(a["weight"], b["weight"], atol=2e-3)
    np.testing.assert_allclose(a["test_acc"], b["test_acc"], atol=1.0)
