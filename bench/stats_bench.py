"""Feature statistics: our streamed sufficient statistics against the reference's per-class loop.

Both compute A (feature x class Pearson correlation, specs/qpm.md §5.2) from the same synthetic
post-ReLU features (N x F, C classes). The reference keeps the whole N x F matrix in RAM and, for every
class, recomputes the centred matrix and its standard deviation (hotspot H4); ours streams batches into
float64 sums (one pass, O(N·F) plus a C x F index_add) and derives A in closed form. Each method runs in its
own subprocess so its peak RSS is its own; the peak above the imports (torch alone takes ~0.5 GB) is
reported too. Time excludes generating the features.

    python bench/stats_bench.py [--n 50000 --f 2048 --c 1000] [--out bench/out/stats.json]
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

BATCH = 1024


def batches(n: int, f: int, c: int, seed: int = 0):
    """Deterministic synthetic features: class prototypes + noise, rectified, float32."""
    rng = np.random.default_rng(seed)
    prototypes = rng.gamma(2.0, 1.0, size=(c, f)).astype(np.float32)
    for start in range(0, n, BATCH):
        m = min(BATCH, n - start)
        y = rng.integers(0, c, m)
        x = np.maximum(prototypes[y] + rng.normal(0, 1.0, size=(m, f)).astype(np.float32), 0)
        yield x, y


def run_ours(n: int, f: int, c: int) -> tuple[float, np.ndarray]:
    import torch

    from qpm_dist.stats.accumulate import FeatureSums
    from qpm_dist.stats.constants import compute_A

    torch.set_num_threads(2)
    sums = FeatureSums.zeros(f, c)
    elapsed = 0.0
    for x, y in batches(n, f, c):
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        t0 = time.perf_counter()
        sums.update(xt, yt)
        elapsed += time.perf_counter() - t0
    t0 = time.perf_counter()
    A = compute_A(sums)
    return elapsed + time.perf_counter() - t0, A


def run_reference(n: int, f: int, c: int) -> tuple[float, np.ndarray]:
    parts = list(batches(n, f, c))
    X = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    del parts
    t0 = time.perf_counter()
    A = np.zeros((f, c))
    for k in range(c):  # the reference's loop: centred matrix and std recomputed for every class
        centred = X - X.mean(axis=0)
        std = X.std(axis=0)
        indicator = (y == k).astype(np.float32)
        ind_centred = indicator - indicator.mean()
        A[:, k] = (centred * ind_centred[:, None]).mean(axis=0) / (std * indicator.std())
    A /= np.abs(A).max()
    return time.perf_counter() - t0, A


def child(method: str, n: int, f: int, c: int, out: Path) -> None:
    import psutil

    if method == "ours":  # the imports' own footprint (torch) is not the algorithm's
        import torch  # noqa: F401

        from qpm_dist.stats import accumulate, constants  # noqa: F401
    baseline_mb = psutil.Process().memory_info().rss / 2**20
    seconds, A = (run_ours if method == "ours" else run_reference)(n, f, c)
    np.save(out.with_suffix(f".{method}.A.npy"), A)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": method, "seconds": seconds, "peak_rss_mb": peak_mb,
                      "peak_above_imports_mb": peak_mb - baseline_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--f", type=int, default=2048)
    parser.add_argument("--c", type=int, default=1000)
    parser.add_argument("--out", default="bench/out/stats.json")
    parser.add_argument("--child", choices=["ours", "reference"])
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args.child, args.n, args.f, args.c, out)
        return
    rows = {}
    for method in ("ours", "reference"):
        proc = subprocess.run([sys.executable, __file__, "--child", method, "--n", str(args.n), "--f", str(args.f),
                               "--c", str(args.c), "--out", str(out)], capture_output=True, text=True, check=True)
        rows[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = rows[method]
        print(f"{method:9s}: {r['seconds']:8.2f} s, peak RSS {r['peak_rss_mb']:6.0f} MB "
              f"({r['peak_above_imports_mb']:6.0f} MB above the imports)", flush=True)
    a_ours = np.load(out.with_suffix(".ours.A.npy"))
    a_ref = np.load(out.with_suffix(".reference.A.npy"))
    result = {
        "n": args.n, "f": args.f, "c": args.c, **{f"{m}_{k}": v for m, r in rows.items() for k, v in r.items()
                                                  if k != "method"},
        "time_ratio": rows["reference"]["seconds"] / rows["ours"]["seconds"],
        "memory_ratio": rows["reference"]["peak_rss_mb"] / rows["ours"]["peak_rss_mb"],
        "memory_ratio_above_imports": (rows["reference"]["peak_above_imports_mb"]
                                       / max(rows["ours"]["peak_above_imports_mb"], 1.0)),
        "max_abs_diff_A": float(np.abs(a_ours - a_ref).max()),
    }
    out.write_text(json.dumps(result, indent=1))
    print(f"time ratio {result['time_ratio']:.1f}x, peak-memory ratio {result['memory_ratio']:.1f}x "
          f"({result['memory_ratio_above_imports']:.1f}x above the imports), "
          f"max |A_ours - A_reference| = {result['max_abs_diff_A']:.2e}")


if __name__ == "__main__":
    main()
