"""`solve(problem, backend=...)`: preprocess, run a backend, recompute and check, return a Result."""
from __future__ import annotations

import math
import time

import numpy as np

from .backends import Solution, run_backend
from .objective import evaluate
from .preprocess import Prepared, prepare
from .problem import Problem
from .result import Result, ResultError
from .util import SolveLog
from .validate import objective_tolerance, validate_result


def finalize(problem: Problem, prep: Prepared, solution: Solution, backend: str, log: SolveLog,
             timings: dict) -> Result:
    """Sort the selection, recompute every objective term independently of the backend, compare with
    the backend's claim, and run the single validation gate."""
    order = np.argsort(solution.selected, kind="stable")
    selected = np.asarray(solution.selected, dtype=np.int64)[order]
    assignment = np.asarray(solution.assignment, dtype=bool)[:, order]
    terms = evaluate(prep, selected, assignment)
    if math.isnan(solution.objective):
        log(f"{backend} reports no value of its own for this solution; objective recomputed from A, D, b")
    elif not abs(terms.total - solution.objective) <= objective_tolerance(terms) * 10:
        raise ResultError(f"backend {backend} claims objective {solution.objective!r}, "
                          f"recomputed {terms.total!r}")
    result = Result(
        selected=selected,
        assignment=assignment,
        objective=terms.total,
        assignment_term=terms.assignment,
        penalty_term=terms.penalty,
        bias_term=terms.bias,
        bound=float(solution.bound),
        gap=Result.relative_gap(terms.total, float(solution.bound)),
        status=solution.status,
        backend=backend,
        timings={**timings, **solution.timings},
        tau=prep.tau,
        n_penalised_pairs=int(prep.pair_w.size),
        problem_hash=problem.content_hash(),
        options_hash=problem.options_hash(),
        options=dict(problem.options),
    )
    validate_result(problem, result, prep)
    log(result.summary())
    result.log = log.text()
    return result


def solve(problem: Problem, backend: str | None = None, *, time_limit: float | None = None,
          mip_gap: float | None = None, threads: int | None = None, seed: int | None = None,
          **options) -> Result:
    """Solve a problem. Keyword options override those stored in the problem (see problem.OPTION_TYPES)."""
    problem = problem.with_options(backend=backend, time_limit=time_limit, mip_gap=mip_gap, threads=threads,
                                   seed=seed, **options)
    log = SolveLog()
    t0 = time.perf_counter()
    F, C = problem.A.shape
    log(f"problem {problem.content_hash()[:16]}: F={F} C={C} n={problem.n_features} k={problem.n_per_class} "
        f"options={dict(problem.options)}")
    prep = prepare(problem)
    log(f"preprocess: {prep.describe()} in {prep.seconds:.2f}s")
    t1 = time.perf_counter()
    solution, used = run_backend(problem, prep, problem.option("backend", "auto"), log)
    t2 = time.perf_counter()
    result = finalize(problem, prep, solution, used, log, {"preprocess": t1 - t0, "solve": t2 - t1})
    result.timings["total"] = time.perf_counter() - t0
    return result
