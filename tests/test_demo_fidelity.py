"""On the demo itself (the full embedded dataset, configs/demo_qsenn.yaml, 2 processes, up to Q-SENN's first
sparse layer): the greedy selection's 16 features localise at least 10 distinct ground-truth parts, and the
ternary head Q-SENN installs in round 0 agrees with the reference solver's (specs/qsenn_sldd.md §4, §7).

Slow (about 3 minutes: the demo's dense model is trained); `make test-slow` runs it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, clean_env, load_weights, qpm_command, stage_dir
from qpm_dist.cli import demo_environment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_round0(tmp_path_factory):
    from data_prep.synthetic import generate

    tmp = tmp_path_factory.mktemp("demo")
    root = generate(tmp / "synthetic", workers=2)
    out = tmp / "runs"
    # as `qpm-dist demo` runs it: its pinned threads and kernels (cli.demo_environment)
    env = {**clean_env(), **demo_environment({})}
    proc = subprocess.run(qpm_command(2, "run", str(REPO / "configs" / "demo_qsenn.yaml"), "--stage", "qsenn_sparse0",
                                      f"data.root={root}", f"run.out_dir={out}", "wandb.mode=disabled",
                                      "engine.progress=false"), capture_output=True, text=True, timeout=1200, env=env,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, out


def demo_config(root: Path):
    from qpm_dist.config import load_config

    return load_config(REPO / "configs" / "demo_qsenn.yaml", [f"data.root={root}"])


def test_the_selected_features_localise_at_least_10_parts(demo_round0):
    """The first 16 features to enter the group-lasso path localised 8 of the 16 parts (several near-copies
    enter together); admitting one feature at a time, as the reference does, gives 10 (measured)."""
    from qpm_dist import dist
    from qpm_dist.data.sources import build_datasets
    from qpm_dist.engine.evaluate import autocast_for
    from qpm_dist.metrics.parts import part_localisation
    from qpm_dist.models.io import load_classifier

    root, out = demo_round0
    cfg = demo_config(root)
    data = build_datasets(cfg.data, cfg.run.seed)
    info = dist.init("cpu")
    dense = load_classifier(stage_dir(out, "dense") / "model.pt", cfg.model)
    best = part_localisation(dense, data, info, autocast_for("fp32", info.device), 128)["feature_best_part"]
    selected = json.loads((stage_dir(out, "glm_select") / "selection.json").read_text())["selected"]
    assert len(selected) == 16
    assert len({best[j] for j in selected}) >= 10, {j: best[j] for j in selected}


def test_qsenn_round_0_agrees_with_glm_saga(demo_round0):
    """glm.solver=auto fits the demo's path with glm-saga: its ternary pattern is the reference solver's (another
    seed agrees on 80 of 80 entries, measured). The fast solver's exact path, ended at qsenn.fast_epsilon,
    agrees on 74 (at glm.fit.epsilon = 1e-3: 58, the reason fast_epsilon exists)."""
    from qpm_dist.glm.fast import FastGLM
    from qpm_dist.glm.path import fit_path
    from qpm_dist.glm.problem import class_correlation, lambda_grid, lambda_max, optimal_bias
    from qpm_dist.glm.rules import quantize_qsenn
    from qpm_dist.glm.saga import SagaGLM, SagaOptions
    from qpm_dist.glm.shards import load_rows, read_meta
    from qpm_dist.methods.glm_stages import FEATURE_SUMS
    from qpm_dist.stats.accumulate import FeatureSums

    root, out = demo_round0
    cfg = demo_config(root)
    installed = load_weights(stage_dir(out, "qsenn_sparse0") / "model.pt")["head.weight"].numpy()
    assert json.loads((stage_dir(out, "qsenn_fit0") / "stage.json").read_text())["summary"]["solver"] == "glm_saga"
    features = stage_dir(out, "features")
    sums = FeatureSums.load(features / FEATURE_SUMS)
    cols = torch.tensor(json.loads((stage_dir(out, "glm_select") / "selection.json").read_text())["selected"])
    mean, std = sums.mean[cols], sums.std[cols]
    X, y = load_rows(features, "train", list(range(read_meta(features)["world_size"])), mean, std,
                     torch.device("cpu"), cols)
    corr = class_correlation(sums.class_sums[:, cols], sums.class_counts, mean, std, float(sums.count))
    lam_max = lambda_max(corr, 0.99, group=False)
    bias, classes = optimal_bias(sums.class_counts), sums.class_counts.numel()
    q = cfg.qsenn

    def pattern(solver, epsilon: float) -> np.ndarray:
        last = fit_path(solver, lambda_grid(lam_max, cfg.glm.fit.path_points, epsilon), 0.99)[-1]
        return np.sign(quantize_qsenn(last.weight, q.n_per_class, q.min_per_class)[0])

    def agreement(other: np.ndarray) -> int:
        return int(((other == np.sign(installed)) & (installed != 0)).sum())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # glm-saga's many small ops
    try:
        saga = pattern(SagaGLM(X, y, classes, bias, SagaOptions(lookbehind=5, seed=1)), cfg.glm.fit.epsilon)
        fast = pattern(FastGLM(X, y, classes, len(y), bias, reduce=False), q.fast_epsilon)
    finally:
        torch.set_num_threads(threads)
    assert int((installed != 0).sum()) == q.n_per_class * classes == 80
    assert agreement(saga) >= 75
    assert agreement(fast) >= 72
