"""`gurobi`: the reference MIQP (spec 5.6) and its iterative constraint loop (spec 5.8), fixed.

Base model: binary E (F x C) and s (F) with E <= s (the equivalent of E = W * s without W),
sum s = n, sum E <= k C, sum_j E_jc >= 1 for every class; maximise
sum a E + sum b s - sum_{(i,j) in D} R~_ij s_i s_j (Gurobi handles the binary products itself).

Loop: solve; classes with fewer than k features become "problematic" (accumulated) and get
sum_j E_jc >= k; classes with identical sets get the reference's norm constraint u = ||d||_1 >= 1,
d = E_.c1 - E_.c2; re-solve from a repaired start (each class's top-k of the last selection, made
distinct by an optimal matching) until nothing is violated. With sum E <= k C, "every class >= k"
ends at exactly k. Every model of the loop is a relaxation of the final problem, so the last bound
is valid and an optimal last solve is optimal for the final problem. Differences to the reference:
* bug 12: sum_j E_jc >= k runs over all features, not only those selected in earlier rounds, and
  the norm constraint over all features (the reference's |S12| subset could over-constrain);
* bug 13: the loop stops as soon as a solve violates nothing (no extra solve keyed on stale state);
* bug 14: TimeLimit is the total budget of the whole loop, MIPGap/Threads/Seed are set from the
  options, and a time-limited incumbent is reported as status "time_limit", not silently accepted;
* bug 11: the MIP start is the clique of size n from preprocessing (not 50).
The licence is whatever gurobipy finds (licence file, token server, or WLS credentials from the
GRB_WLSACCESSID / GRB_WLSSECRET / GRB_LICENSEID environment variables).
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

from ..dedup import distinct_assignment
from ..objective import duplicate_groups, duplicate_pairs
from ..preprocess import Prepared
from ..problem import Problem
from ..util import SolveLog
from .base import DEFAULT_MIP_GAP, BackendUnavailable, LicenceLimitError, Solution, SolverError

LICENCE_LIMIT_ERRNO = 10010
WLS_ENV = {"GRB_WLSACCESSID": "WLSAccessID", "GRB_WLSSECRET": "WLSSecret", "GRB_LICENSEID": "LicenseID"}


def _import_gurobipy():
    try:
        import gurobipy
    except ImportError as exc:
        raise BackendUnavailable(
            f"backend 'gurobi' needs gurobipy ({exc}); pip install gurobipy (plus a licence), or use the "
            "open-source backends 'highs' (exact MILP) or 'fast' (heuristic with bound)") from exc
    return gurobipy


def licence_message(n_vars: int, n_constrs: int, quadratic: bool) -> str:
    return (f"Gurobi refused the model ({n_vars} variables, {n_constrs} constraints"
            f"{', quadratic objective' if quadratic else ''}): it is too large for the licence gurobipy found "
            f"(errno {LICENCE_LIMIT_ERRNO}; the pip licence allows 2000 variables and constraints, and only 200 "
            "variables once anything is quadratic). Use a full licence (licence file, WLS or token server), or the "
            "open-source backends: backend='highs' (exact MILP, small and medium problems) or backend='fast' "
            "(any size, with an upper bound).")


def violations(assignment_full: np.ndarray, k: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(classes with fewer than k features, groups of classes with identical sets) for an F x C
    0/1 matrix: the ClassSparsity and Deduplication checks, vectorised (hotspot H8)."""
    counts = assignment_full.sum(axis=0)
    return np.flatnonzero(counts < k), duplicate_groups(assignment_full.T.astype(bool))


def repaired_start(prep: Prepared, selected: np.ndarray) -> np.ndarray:
    """A feasible solution of the final problem on `selected`: F x C 0/1 with each class's best
    distinct k-subset (the reference's start heuristics, replaced by an optimal matching)."""
    assignment, _ = distinct_assignment(prep.a[selected], prep.k)
    full = np.zeros(prep.a.shape)
    full[selected] = assignment.T
    return full


def add_class_sparsity(m, E, c: int, k: int):
    """sum_j E_jc >= k over all features (bug 12: the reference counts only features selected in
    earlier rounds, so a class could not be completed with a feature new to the solve)."""
    return m.addConstr(E[:, c].sum() >= k, name=f"class_sparsity_{c}")


def add_distinct(m, gp, E, c1: int, c2: int):
    """Classes c1 and c2 differ somewhere: d = E_.c1 - E_.c2 (integer in [-1, 1]), u = ||d||_1 >= 1,
    the reference's norm form, but over all features instead of the union of the two classes'
    start sets (which could forbid distinct sets that agree on that union)."""
    F = E.shape[0]
    d = m.addMVar(F, lb=-1, ub=1, vtype=gp.GRB.INTEGER, name=f"d_{c1}_{c2}")
    u = m.addVar(lb=0, name=f"u_{c1}_{c2}")
    m.addConstr(d == E[:, c1] - E[:, c2])
    m.addGenConstrNorm(u, d.tolist(), 1.0)
    m.addConstr(u >= 1)
    return d, u


def _env(gp, log: SolveLog):
    env = gp.Env(empty=True)
    env.setParam("OutputFlag", 0)
    for var, param in WLS_ENV.items():
        if os.environ.get(var):
            env.setParam(param, int(os.environ[var]) if param == "LicenseID" else os.environ[var])
            log(f"gurobi: {param} from ${var}")
    try:
        env.start()
    except gp.GurobiError as exc:
        raise BackendUnavailable(f"gurobipy could not start an environment (errno {exc.errno}: {exc}); "
                                 "use backend='highs' or backend='fast'") from exc
    return env


def solve(problem: Problem, prep: Prepared, log: SolveLog) -> Solution:
    gp = _import_gurobipy()
    GRB = gp.GRB
    t0 = time.perf_counter()
    time_limit = float(problem.option("time_limit", math.inf))
    F, C, n, k = prep.n_features_total, prep.n_classes, prep.n, prep.k
    env = _env(gp, log)
    m = gp.Model("assignment", env=env)
    E = m.addMVar((F, C), vtype=GRB.BINARY, name="E")
    s = m.addMVar(F, vtype=GRB.BINARY, name="s")
    m.addConstr(E <= s[:, None], name="E_le_s")
    m.addConstr(s.sum() == n, name="n_features")
    m.addConstr(E.sum() <= k * C, name="budget")
    m.addConstr(E.sum(axis=0) >= 1, name="one_per_class")
    objective = (prep.a * E).sum() + prep.b @ s
    if prep.pair_w.size:
        objective = objective - (prep.pair_w * s[prep.pair_i] * s[prep.pair_j]).sum()
    m.setObjective(objective, GRB.MAXIMIZE)
    m.Params.LogToConsole = 0  # the log reaches us through the MESSAGE callback instead
    m.Params.OutputFlag = 1
    m.Params.MIPGap = float(problem.option("mip_gap", DEFAULT_MIP_GAP))
    m.Params.Seed = int(problem.option("seed", 0))
    if problem.option("threads") is not None:
        m.Params.Threads = int(problem.option("threads"))
    if prep.clique is not None:
        start = np.zeros(F)
        start[prep.clique] = 1.0
        s.Start = start
    log(f"gurobi {gp.gurobi.version()}: MIPGap={m.Params.MIPGap} Seed={m.Params.Seed} Threads={m.Params.Threads} "
        f"time limit {time_limit:g}s for the whole loop")

    def on_message(model, where):
        if where == GRB.Callback.MESSAGE:
            log.progress("gurobi: " + model.cbGet(GRB.Callback.MSG_STRING).rstrip())

    problematic: set[int] = set()
    forbidden: set[tuple[int, int]] = set()
    rounds, bound, status, best = 0, math.inf, "heuristic", None
    while True:
        remaining = time_limit - (time.perf_counter() - t0)
        if remaining <= 0:
            status = "time_limit"
            break
        m.Params.TimeLimit = min(remaining, GRB.INFINITY)
        rounds += 1
        try:
            m.optimize(on_message)
        except gp.GurobiError as exc:
            if exc.errno == LICENCE_LIMIT_ERRNO:
                m.update()
                raise LicenceLimitError(licence_message(m.NumVars, m.NumConstrs + m.NumGenConstrs,
                                                        bool(prep.pair_w.size))) from exc
            raise SolverError(f"Gurobi failed (errno {exc.errno}): {exc}") from exc
        log(f"gurobi round {rounds}: status {m.Status} objective {m.ObjVal if m.SolCount else math.nan:.6f} "
            f"bound {m.ObjBound:.6f} gap {m.MIPGap if m.SolCount else math.nan:.3g} "
            f"({m.NumVars} vars, {m.NumConstrs} constrs, {m.NumGenConstrs} norm constrs)")
        if m.Status not in (GRB.OPTIMAL, GRB.TIME_LIMIT, GRB.INTERRUPTED, GRB.SUBOPTIMAL) or m.SolCount == 0:
            if best is not None:
                status = "time_limit"
                break
            raise SolverError(f"Gurobi ended with status {m.Status} and no solution")
        bound = min(bound, m.ObjBound)
        selected = np.sort(np.argsort(-s.X, kind="stable")[:n])
        full = (E.X > 0.5).astype(np.float64)
        few, groups = violations(full, k)
        best = selected, full
        if m.Status != GRB.OPTIMAL:
            status = "time_limit"
            break
        if few.size == 0 and not groups:
            status = "optimal"
            break
        new_few = [int(c) for c in few if int(c) not in problematic]
        for c in new_few:
            add_class_sparsity(m, E, c, k)
        problematic.update(new_few)
        new_pairs = [pair for pair in duplicate_pairs(groups) if pair not in forbidden]
        for c1, c2 in new_pairs:
            add_distinct(m, gp, E, c1, c2)
        forbidden.update(new_pairs)
        log(f"gurobi: {few.size} classes below k ({len(problematic)} constrained), {len(groups)} duplicate "
            f"groups ({len(forbidden)} pairs constrained)")
        start = repaired_start(prep, selected)
        E.Start = start
        s.Start = np.isin(np.arange(F), selected).astype(np.float64)
    if best is None:
        raise SolverError(f"Gurobi found no solution within the time limit of {time_limit:g}s")
    selected, full = best
    assignment = full[selected].T.astype(bool)
    if status != "optimal":  # stopped early: make the incumbent a solution of the final problem
        assignment = repaired_start(prep, selected)[selected].T.astype(bool)
    claimed = m.ObjVal if status == "optimal" else math.nan  # a repaired incumbent has no solver value
    m.dispose()
    env.dispose()
    log(f"gurobi: {rounds} solves")
    return Solution(selected, assignment, float(claimed), bound=bound, status=status)
