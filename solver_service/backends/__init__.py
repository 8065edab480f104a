"""Backend registry and the `auto` choice. Backends are imported lazily: gurobipy and highspy are
optional, and importing a solver package the run does not need only costs time and memory."""
from __future__ import annotations

import importlib
import importlib.util
import math

from ..preprocess import Prepared
from ..problem import Problem
from ..util import SolveLog
from .base import BackendUnavailable, LicenceLimitError, Solution, SolverError

# `auto` hands a problem to the exact MILP only while HiGHS proves optimality quickly:
HIGHS_AUTO_MAX_ENTRIES = 4000   # F * C
HIGHS_AUTO_MAX_PAIRS = 4000     # |D|
HIGHS_AUTO_SUBSET_SLACK = 2     # C * slack <= C(n, k): when uniqueness binds tightly, its lazy cuts are slow

__all__ = ["BackendUnavailable", "LicenceLimitError", "Solution", "SolverError", "choose_backend", "run_backend"]


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def choose_backend(problem: Problem, prep: Prepared, log: SolveLog) -> str:
    F, C = prep.a.shape
    if problem.option("prefer_gurobi", False):
        if installed("gurobipy"):
            log("auto: gurobi (prefer_gurobi is set and gurobipy is installed)")
            return "gurobi"
        log("auto: prefer_gurobi is set but gurobipy is not installed")
    subsets = math.comb(prep.n, prep.k)
    size = f"F*C = {F * C}, |D| = {prep.pair_w.size}, C = {C} of C(n,k) = {subsets} possible sets"
    if (F * C <= HIGHS_AUTO_MAX_ENTRIES and prep.pair_w.size <= HIGHS_AUTO_MAX_PAIRS
            and C * HIGHS_AUTO_SUBSET_SLACK <= subsets):
        if installed("highspy"):
            log(f"auto: highs ({size}: small enough to prove optimality)")
            return "highs"
        log("auto: small enough for highs, but highspy is not installed")
    else:
        log(f"auto: fast ({size}: beyond what the exact MILP proves quickly)")
    return "fast"


def run_backend(problem: Problem, prep: Prepared, name: str, log: SolveLog) -> tuple[Solution, str]:
    """Run backend `name` (or the `auto` choice); returns the solution and the backend that made it."""
    auto = name == "auto"
    if auto:
        name = choose_backend(problem, prep, log)
    module = importlib.import_module(f".{name}", __name__)
    try:
        return module.solve(problem, prep, log), name
    except (LicenceLimitError, BackendUnavailable) as exc:
        if not auto or name != "gurobi":
            raise
        log(f"auto: gurobi is not usable here ({exc}); choosing again without it")
        return run_backend(problem.with_options(prefer_gurobi=False), prep, "auto", log)
