"""Solver benchmark: exactness of `fast` against proven optima, fast vs highs at medium size,
preprocessing at F = 2048, and end-to-end `fast` runs at CUB and ImageNet size (wall time and peak
RSS of a fresh `python -m solver_service solve` process).

    PYTHONPATH=. python bench/solver_bench.py [--quick] [--out bench/out/solver_bench.json]
    PYTHONPATH=. python bench/solver_bench.py --report bench/out/solver_bench.json   # tables again

Writes a JSON of every measurement and prints markdown tables (docs/BENCHMARKS.md, "## Solver").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from solver_service import Result, solve, validate_result  # noqa: E402
from solver_service.preprocess import prepare  # noqa: E402
from solver_service.synthetic import random_problem, realistic_problem  # noqa: E402


def exactness(count: int, highs_limit: float, seed: int = 2025) -> dict:
    """Random small instances (F <= 40, C <= 20), alternately unstructured and realistic; only those
    where highs proves optimality count."""
    rng = np.random.default_rng(seed)
    rows, skipped, i = [], 0, 0
    while len(rows) < count and i < 4 * count:
        F, C = int(rng.choice([16, 24, 32, 40])), int(rng.choice([4, 8, 12, 16, 20]))
        n, k = int(rng.choice([5, 6, 8, 10])), int(rng.choice([2, 3]))
        if C > math.comb(n, k):
            continue
        i += 1
        if i % 2:
            p = random_problem(F, C, n, k, seed=i)
        else:
            p = realistic_problem(F, C, n, k, seed=i, rank=8, samples_per_class=20, superclass_size=4)
        h = solve(p, backend="highs", time_limit=highs_limit)
        if h.status != "optimal":
            skipped += 1
            continue
        f = solve(p, backend="fast", seed=0)
        rows.append({"F": F, "C": C, "n": n, "k": k, "kind": "random" if i % 2 else "realistic",
                     "optimum": h.objective, "fast": f.objective, "ratio": f.objective / h.objective,
                     "highs_s": h.timings["total"], "fast_s": f.timings["total"]})
        print(f"  exactness {len(rows)}/{count}: {rows[-1]}", flush=True)
    ratios = np.array([r["ratio"] for r in rows])
    return {"instances": rows, "n": len(rows), "skipped_not_proven": skipped,
            "at_least_99_5": int(np.sum(ratios >= 0.995)), "optimal": int(np.sum(ratios >= 1 - 1e-9)),
            "worst_ratio": float(ratios.min()), "median_fast_s": float(np.median([r["fast_s"] for r in rows])),
            "median_highs_s": float(np.median([r["highs_s"] for r in rows]))}


def medium(highs_limit: float) -> dict:
    p = realistic_problem(256, 100, 50, 5, seed=1)
    f = solve(p, backend="fast", seed=0)
    h = solve(p, backend="highs", time_limit=highs_limit)
    out = {"F": 256, "C": 100, "n": 50, "k": 5, "highs_time_limit": highs_limit}
    for name, r in (("fast", f), ("highs", h)):
        out[name] = {"objective": r.objective, "bound": r.bound, "gap": r.gap, "status": r.status,
                     "seconds": r.timings["total"]}
    out["objective_ratio_fast_over_highs"] = f.objective / h.objective
    out["time_ratio_highs_over_fast"] = h.timings["total"] / f.timings["total"]
    out["gap_fast_to_highs_bound"] = Result.relative_gap(f.objective, h.bound)
    print(f"  medium: {out}", flush=True)
    return out


def cli_solve(problem_path: Path, out_path: Path, *extra: str) -> dict:
    """A fresh process: `python -m solver_service solve ...`; wall time and its own peak RSS.

    Peak RSS is VmHWM of the child's address space: ru_maxrss would also count what the child
    had just after fork, i.e. the benchmark parent's resident memory."""
    code = ("import re, sys; from solver_service.cli import main; rc = main(sys.argv[1:]); "
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
            "print('PEAK_RSS_KB', hwm, file=sys.stderr); sys.exit(rc)")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "-q", "solve", str(problem_path), "--out", str(out_path),
                           "--backend", "fast", *extra], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    rss_kb = int(proc.stderr.split("PEAK_RSS_KB")[1].split()[0])
    return {"wall_s": wall, "peak_rss_mb": rss_kb / 1024}


def scale(name: str, F: int, C: int, limit_s: float, workdir: Path, extra_runs: list[list[str]]) -> dict:
    t0 = time.perf_counter()
    p = realistic_problem(F, C, 50, 5, seed=0)
    gen_s = time.perf_counter() - t0
    path = workdir / f"{name}.npz"
    p.save(path)
    prep = prepare(p)
    out = {"name": name, "F": F, "C": C, "n": 50, "k": 5, "generate_s": gen_s, "preprocess_s": prep.seconds,
           "tau": prep.tau, "penalised_pairs": int(prep.pair_w.size), "limit_s": limit_s, "runs": []}
    for args in [[]] + extra_runs:
        run = cli_solve(path, workdir / f"{name}_result.npz", *args)
        r = Result.load(workdir / f"{name}_result.npz")
        validate_result(p, r, prep)
        run.update(args=" ".join(args) or "(defaults: seed 0, effort 1)", objective=r.objective, bound=r.bound,
                   gap=r.gap, status=r.status, solve_s=r.timings["solve"],
                   within_limit=run["wall_s"] <= limit_s and run["peak_rss_mb"] <= 4096)
        out["runs"].append(run)
        print(f"  {name}: {run}", flush=True)
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"Machine: {m['cpus']} cores, {m['platform']}, Python {m['python']}, numpy {m['numpy']}; "
             f"load average at start {m['load_start']}, at end {m['load_end']} (shared machine).", ""]
    e = res["exactness"]
    lines += ["| exactness (F <= 40, C <= 20, highs proves the optimum) | value |", "|---|---|",
              f"| instances | {e['n']} (+{e['skipped_not_proven']} skipped: highs did not prove optimality) |",
              f"| fast >= 99.5% of the optimum | {e['at_least_99_5']} / {e['n']} |",
              f"| fast = optimum (1e-9) | {e['optimal']} / {e['n']} |",
              f"| worst fast / optimum | {e['worst_ratio']:.6f} |",
              f"| median time fast / highs | {e['median_fast_s']:.2f} s / {e['median_highs_s']:.2f} s |", ""]
    md = res["medium"]
    lines += ["| medium F=256 C=100 n=50 k=5 | fast | highs |", "|---|---|---|"]
    for key in ("objective", "bound", "gap", "status", "seconds"):
        fv, hv = md["fast"][key], md["highs"][key]
        fmt = (lambda v: f"{v:.3%}") if key == "gap" else (lambda v: f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append(f"| {key} | {fmt(fv)} | {fmt(hv)} |")
    lines += [f"| objective ratio fast/highs | {md['objective_ratio_fast_over_highs']:.4f} | |",
              f"| time ratio highs/fast | {md['time_ratio_highs_over_fast']:.1f}x | (highs time limit "
              f"{md['highs_time_limit']:.0f} s) |",
              f"| gap of fast to highs's bound | {md['gap_fast_to_highs_bound']:.3%} | |", ""]
    lines += ["| scale (realistic, n=50 k=5) | preprocess | run | wall | peak RSS | objective | bound | gap | within limits |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in res["scale"]:
        for i, r in enumerate(s["runs"]):
            ok = ("yes" if r["within_limit"] else "NO") if i == 0 else "(stability check, no limit)"
            lines.append(f"| {s['name']} F={s['F']} C={s['C']} (|D|={s['penalised_pairs']}) | {s['preprocess_s']:.2f} s "
                         f"| {r['args']} | {r['wall_s']:.0f} s | {r['peak_rss_mb']:.0f} MB "
                         f"| {r['objective']:.4f} | {r['bound']:.4f} | {r['gap']:.2%} | {ok} |")
    lines.append("")
    lines.append("Limits: CUB 120 s, ImageNet 600 s wall for a fresh process (load, preprocess, solve, bound, "
                 "validate, write), peak RSS 4 GB.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="6 exactness instances, highs 60 s, CUB size only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "solver_bench.json"))
    ap.add_argument("--report", metavar="JSON", help="only print the tables of an earlier run")
    args = ap.parse_args()
    if args.report:
        print(markdown(json.loads(Path(args.report).read_text())))
        return
    res = {"command": " ".join(["bench/solver_bench.py"] + sys.argv[1:]), "quick": args.quick,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                       "numpy": np.__version__, "load_start": [round(x, 2) for x in os.getloadavg()]}}
    t0 = time.perf_counter()
    print("exactness ...", flush=True)
    res["exactness"] = exactness(6 if args.quick else 24, 60.0 if args.quick else 120.0)
    print("medium ...", flush=True)
    res["medium"] = medium(60.0 if args.quick else 300.0)
    print("scale ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        res["scale"] = [scale("CUB", 2048, 200, 120.0, Path(tmp), [] if args.quick else [["--seed", "1", "--effort", "3"]])]
        if not args.quick:
            res["scale"].append(scale("ImageNet", 2048, 1000, 600.0, Path(tmp), []))
    res["machine"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
    res["total_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print()
    print(markdown(res))
    print(f"\nwrote {args.out} in {res['total_s']:.0f} s")


if __name__ == "__main__":
    main()
