"""Sparse solvers: `glm.solver=fast` (full-batch FISTA) against the reference glm-saga on the same data.

Both solvers run the SLDD / Q-SENN solver work on the same standardised synthetic "deep features"
(qpm_dist.glm.synthetic; N x F, C classes, post-ReLU-like, correlated): the greedy selection of n_features
(one feature at a time; each step a ridge fit of the selected ones, ridge ε·λ_max of the α = 0.8 group lasso),
then the elastic-net path (α = 0.99) on the features each solver selected, from λ_max down to ε·λ_max. Both
run the same code (qpm_dist.glm.path) as the pipeline's select and fit stages. Reported: overlap of the two selections, test
accuracy of the linear layer at the last path point (Q-SENN's point) and after SLDD's point choice +
pruning and Q-SENN's quantisation, time, and peak RSS. Each solver runs in its own subprocess so its peak
RSS is its own; "above data" subtracts the RSS after imports and loading the features.

glm-saga's per-λ cost is up to `--max-epochs` passes (its own stopping rule: lookbehind, tol). At the full
size its path can take hours on a CPU, so the path can be shortened with options that apply to BOTH
solvers identically: `--fit-points` (λ values of the fit path, same ε) and `--max-epochs` (glm-saga: epochs
per λ or selection step; fast: iterations, one full pass over the rows each). `--selection-points` is accepted
for old command lines and unused (the greedy selection has no λ grid).

    python bench/sparse_bench.py [--n 20000 --f 512 --c 100] [--selection-points 100 --fit-points 100]
                                 [--max-epochs 2000] [--threads 1] [--out bench/out/sparse.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_data(args, folder: Path) -> None:
    """Features, standardised with the training rows' population mean/std (as the features stage does)."""
    from qpm_dist.glm.synthetic import synthetic_features

    X, y, Xt, yt = synthetic_features(args.n, args.f, args.c, n_test=args.n_test, seed=args.seed)
    mean, std = X.mean(0, dtype=np.float64), X.std(0, dtype=np.float64)
    std = np.maximum(std, 1e-6)
    np.save(folder / "X.npy", ((X - mean) / std).astype(np.float32))
    np.save(folder / "Xt.npy", ((Xt - mean) / std).astype(np.float32))
    np.save(folder / "y.npy", y)
    np.save(folder / "yt.npy", yt)


def child(args, folder: Path) -> dict:
    import psutil
    import torch

    from qpm_dist.glm.fast import FastGLM, FastOptions
    from qpm_dist.glm.path import fit_path, select_features
    from qpm_dist.glm.problem import class_correlation, lambda_grid, lambda_max, optimal_bias
    from qpm_dist.glm.rules import choose_sldd_point, fill_empty_rows, prune_sldd, quantize_qsenn
    from qpm_dist.glm.saga import SagaGLM, SagaOptions
    import glm_saga.elasticnet  # noqa: F401  (imports are not the algorithm's memory)

    torch.set_num_threads(args.threads)
    X, y = torch.from_numpy(np.load(folder / "X.npy")), torch.from_numpy(np.load(folder / "y.npy"))
    Xt, yt = torch.from_numpy(np.load(folder / "Xt.npy")), torch.from_numpy(np.load(folder / "yt.npy"))
    n, C = X.shape[0], args.c
    counts = torch.bincount(y, minlength=C).double()
    baseline_mb = psutil.Process().memory_info().rss / 2**20

    def corr_of(Xs: torch.Tensor) -> torch.Tensor:
        # the features are standardised already: mean 0, std 1
        S = torch.zeros(C, Xs.shape[1], dtype=torch.float64).index_add_(0, y, Xs.double())
        return class_correlation(S, counts, torch.zeros(Xs.shape[1]), torch.ones(Xs.shape[1]), n)

    def make(Xs: torch.Tensor, test=None):
        if args.child == "fast":
            return FastGLM(Xs, y, C, n, optimal_bias(counts), FastOptions(max_iter=args.max_epochs), reduce=False,
                           test=test)
        return SagaGLM(Xs, y, C, optimal_bias(counts), SagaOptions(max_epochs=args.max_epochs, lookbehind=lookbehind,
                                                                   seed=args.seed), test=test)

    # selection: greedy, ridge ε·λ_max of the α = 0.8 group lasso, glm-saga lookbehind 3 (the reference's)
    t0 = time.perf_counter()
    corr = corr_of(X)
    lookbehind = 3
    ridge = args.epsilon * lambda_max(corr, 0.8, True)
    progress = lambda msg: print(f"[{time.perf_counter() - t0:8.1f} s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    order, records = select_features(make(X), args.n_features, ridge, progress)
    t_select = time.perf_counter() - t0
    # sparse fit: elastic net, α = 0.99, lookbehind 5, on this solver's selection, down to ε·λ_max
    t0 = time.perf_counter()
    cols = torch.tensor(sorted(order))
    Xs, Xts = X[:, cols].contiguous(), Xt[:, cols].contiguous()
    lookbehind = 5
    lams_fit = lambda_grid(lambda_max(corr_of(Xs), 0.99, False), args.fit_points, args.epsilon)
    points = fit_path(make(Xs, (Xts, yt)), lams_fit, 0.99, progress=progress)
    t_fit = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def test_acc(W: np.ndarray, b: np.ndarray) -> float:
        logits = Xts @ torch.from_numpy(W).T + torch.from_numpy(b)
        return 100.0 * float((logits.argmax(1) == yt).double().mean())

    per_class = [p.per_class for p in points]
    k = choose_sldd_point(per_class, 5 / 0.5)
    W_sldd, _ = fill_empty_rows(points[k].weight, [p.weight for p in points[k + 1:]])
    W_sldd = prune_sldd(W_sldd, 5, 1)
    W_q, _ = quantize_qsenn(points[-1].weight, 5, 1)
    return {"solver": args.child, "threads": args.threads, "selected": sorted(order), "entry_order": order,
            "selection_steps": len(records), "selection_seconds": t_select, "fit_seconds": t_fit,
            "seconds": t_select + t_fit, "peak_rss_mb": peak_mb, "peak_above_data_mb": peak_mb - baseline_mb,
            "last_point_test_acc": points[-1].test_acc, "last_point_per_class": points[-1].per_class,
            "sldd_point": k, "sldd_point_test_acc": points[k].test_acc, "sldd_pruned_test_acc": test_acc(W_sldd, points[k].bias),
            "qsenn_quantised_weights_test_acc": test_acc(W_q, points[-1].bias),
            "path_test_acc": [p.test_acc for p in points], "path_per_class": per_class}


def memory_formula(n: int, f: int, c: int, ranks: int, batch: int = 256) -> dict:
    """Bytes held by each solver during the selection (the larger of the two paths: all F features)."""
    gb = 1e9
    fast_rows = n / ranks
    return {
        "n": n, "f": f, "c": c, "ranks": ranks,
        # fast, per rank: its standardised rows (float32) + ~5 n_r x C logit / probability buffers (current,
        # previous, momentum-point, candidate and the log-softmax) + the strong-set copy of the rows (≤ F columns;
        # small during selection, where few features are active) + O(C·F)
        "fast_per_rank_gb": (4 * fast_rows * f + 5 * 4 * fast_rows * c) / gb,
        "fast_formula": "4·(N/W)·F + 5·4·(N/W)·C bytes (+ 4·(N/W)·|strong set| + O(C·F))",
        # glm-saga, one process: all rows (float32) + the SAGA table a (N x C, float32) + two B x C x F outer
        # product tensors per minibatch (g_new and g_old are materialised before their mean)
        "glm_saga_gb": (4 * n * f + 4 * n * c + 2 * 4 * batch * c * f) / gb,
        "glm_saga_formula": "4·N·F + 4·N·C + 2·4·B·C·F bytes (B = 256)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--n-test", type=int, default=5_000)
    parser.add_argument("--f", type=int, default=512)
    parser.add_argument("--c", type=int, default=100)
    parser.add_argument("--n-features", type=int, default=50)
    parser.add_argument("--selection-points", type=int, default=100, help="λ values of the selection path (both)")
    parser.add_argument("--fit-points", type=int, default=100, help="λ values of the fit path (both)")
    parser.add_argument("--epsilon", type=float, default=1e-3)
    parser.add_argument("--max-epochs", type=int, default=2000,
                        help="per λ: glm-saga epochs / fast iterations (one full pass each)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of each solver")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["glm_saga", "fast"], help="run one solver (for timing a size)")
    parser.add_argument("--out", default="bench/out/sparse.json")
    parser.add_argument("--child", choices=["glm_saga", "fast"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    if args.child:
        print(json.dumps(child(args, Path(args.data))))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    data = out.with_suffix(".data")
    data.mkdir(exist_ok=True)
    make_data(args, data)
    passthrough = [a for a in sys.argv[1:] if a not in ("--only", args.only or "")]
    rows = {}
    for solver in ("glm_saga", "fast"):
        if args.only and solver != args.only:
            continue
        log_path = out.with_suffix(f".{solver}.log")  # the child's progress (per λ)
        with open(log_path, "w") as log_file:
            proc = subprocess.run([sys.executable, __file__, *passthrough, "--child", solver, "--data", str(data)],
                                  stdout=subprocess.PIPE, stderr=log_file, text=True)
        if proc.returncode != 0:
            sys.exit(f"{solver} failed, see {log_path}:\n{log_path.read_text()[-3000:]}")
        rows[solver] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{solver:9s}: {r['seconds']:9.1f} s (selection {r['selection_seconds']:.1f} s, "
              f"{r['selection_steps']} steps; fit {r['fit_seconds']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB "
              f"({r['peak_above_data_mb']:.0f} MB above imports + data); test acc at λ_min "
              f"{r['last_point_test_acc']:.2f}% ({r['last_point_per_class']:.1f} per class), SLDD pruned "
              f"{r['sldd_pruned_test_acc']:.2f}%, Q-SENN quantised {r['qsenn_quantised_weights_test_acc']:.2f}%",
              flush=True)
    result = {"n": args.n, "n_test": args.n_test, "f": args.f, "c": args.c, "n_features": args.n_features,
              "selection_points": args.selection_points, "fit_points": args.fit_points, "epsilon": args.epsilon,
              "max_epochs": args.max_epochs, "threads": args.threads, "solvers": rows,
              "imagenet_memory": {w: memory_formula(1_281_167, 2048, 1000, w) for w in (1, 8, 64)},
              "bench_size_memory": memory_formula(args.n, args.f, args.c, 1)}
    if len(rows) == 2:
        s, f = rows["glm_saga"], rows["fast"]
        result.update({
            "selected_overlap": len(set(s["selected"]) & set(f["selected"])),
            "acc_diff_last_point": f["last_point_test_acc"] - s["last_point_test_acc"],
            "acc_diff_sldd_pruned": f["sldd_pruned_test_acc"] - s["sldd_pruned_test_acc"],
            "acc_diff_qsenn_quantised": f["qsenn_quantised_weights_test_acc"] - s["qsenn_quantised_weights_test_acc"],
            "time_ratio": s["seconds"] / f["seconds"],
            "time_ratio_selection": s["selection_seconds"] / f["selection_seconds"],
            "time_ratio_fit": s["fit_seconds"] / f["fit_seconds"],
            "peak_rss_ratio": s["peak_rss_mb"] / f["peak_rss_mb"],
        })
        print(f"selected-feature overlap {result['selected_overlap']}/{args.n_features}; test accuracy fast − glm-saga: "
              f"{result['acc_diff_last_point']:+.2f} points at λ_min, {result['acc_diff_sldd_pruned']:+.2f} SLDD pruned, "
              f"{result['acc_diff_qsenn_quantised']:+.2f} Q-SENN quantised; time ratio {result['time_ratio']:.1f}x "
              f"(selection {result['time_ratio_selection']:.1f}x, fit {result['time_ratio_fit']:.1f}x); "
              f"peak RSS ratio {result['peak_rss_ratio']:.2f}x")
    m = result["bench_size_memory"]
    print(f"memory model at this size: fast {m['fast_per_rank_gb'] * 1e3:.0f} MB, glm-saga {m['glm_saga_gb'] * 1e3:.0f} MB")
    for w, m in result["imagenet_memory"].items():
        print(f"ImageNet (N=1.28M, F=2048, C=1000, float32), W={w}: fast {m['fast_per_rank_gb']:.1f} GB per rank "
              f"[{m['fast_formula']}]; glm-saga {m['glm_saga_gb']:.1f} GB in one process [{m['glm_saga_formula']}]")
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
