"""`highs`: the exact problem as a MILP for HiGHS (open source; no MIQP, so products are linearised).

Variables: E_jc (feature j used by class c), s_j (feature selected), y_p for each penalised pair
p = (i, j). Maximise sum a_jc E_jc + sum b_j s_j - sum w_p y_p subject to
  E_jc <= s_j,   sum_j E_jc = k (every class),   sum_j s_j = n,   y_p >= s_i + s_j - 1,  0 <= y_p <= 1.
Only the lower side of y_p = s_i s_j is needed: y_p has a negative objective coefficient, so an
optimal solution pushes it down to max(0, s_i + s_j - 1), which is exactly the product.

Uniqueness of class sets is added lazily. E of a class is left continuous until the class is in a
uniqueness constraint: for fixed integral s, a class's LP (box + one cardinality row) has integral
optimal vertices, so this is a relaxation that is exact once the extracted solution (each such class
takes its top-k of S) has no duplicates. For every duplicated pair (c1, c2) with common set T:
first a no-good cut sum_{j in T} (E_j,c1 + E_j,c2) <= 2k - 1; if the pair collides again, the full
disjunction with binaries w_j <= E_j,c1, w_j <= 1 - E_j,c2, sum_j w_j >= 1. Re-solve (warm-started
with the deduplicated previous solution) until no duplicates remain. Each bound along the way is a
valid upper bound, since every model is a relaxation of the final problem.
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..dedup import distinct_assignment
from ..objective import duplicate_groups, duplicate_pairs, topk_assignment
from ..preprocess import Prepared
from ..problem import Problem
from ..util import SolveLog
from .base import DEFAULT_MIP_GAP, BackendUnavailable, Solution, SolverError


def _import_highspy():
    try:
        import highspy
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BackendUnavailable(f"backend 'highs' needs the highspy package ({exc}); pip install highspy") from exc
    return highspy


class Model:
    """The MILP held in a Highs object, built and extended with the array API."""

    def __init__(self, prep: Prepared, log: SolveLog):
        hs = self.hs = _import_highspy()
        self.prep, self.log = prep, log
        F, C = prep.a.shape
        self.F, self.C, self.P = F, C, prep.pair_w.size
        self.s0, self.y0 = F * C, F * C + F
        h = self.h = hs.Highs()
        h.setOptionValue("output_flag", True)
        h.setOptionValue("log_to_console", False)
        h.cbLogging.subscribe(lambda event: log.progress("highs: " + event.message.strip()))
        inf = hs.kHighsInf
        ncol = self.y0 + self.P
        cost = np.concatenate([prep.a.ravel(), prep.b, -prep.pair_w])
        h.addVars(ncol, np.zeros(ncol), np.ones(ncol))
        h.changeColsCost(ncol, np.arange(ncol, dtype=np.int32), cost)
        h.changeObjectiveSense(hs.ObjSense.kMaximize)
        self.integral_class = np.zeros(C, dtype=bool)
        self._set_integer(np.arange(self.s0, self.y0))

        j = np.repeat(np.arange(F), C)
        e = np.arange(F * C)
        # E_jc - s_j <= 0
        self._add_rows(np.full(F * C, -inf), np.zeros(F * C), np.arange(0, 2 * F * C + 1, 2),
                       np.column_stack([e, self.s0 + j]).ravel(), np.tile([1.0, -1.0], F * C))
        # sum_j E_jc = k
        self._add_rows(np.full(C, float(prep.k)), np.full(C, float(prep.k)), np.arange(0, F * C + 1, F),
                       np.arange(F * C).reshape(F, C).T.ravel(), np.ones(F * C))
        # sum_j s_j = n
        self._add_rows(np.array([float(prep.n)]), np.array([float(prep.n)]), np.array([0, F]),
                       np.arange(self.s0, self.y0), np.ones(F))
        # s_i + s_j - y_p <= 1
        if self.P:
            p = np.arange(self.P)
            idx = np.column_stack([self.s0 + prep.pair_i, self.s0 + prep.pair_j, self.y0 + p]).ravel()
            self._add_rows(np.full(self.P, -inf), np.ones(self.P), np.arange(0, 3 * self.P + 1, 3),
                           idx, np.tile([1.0, 1.0, -1.0], self.P))
        self.cost = cost
        self.nogood: set[tuple[int, int]] = set()
        self.full_cols: dict[tuple[int, int], int] = {}  # pair -> first column of its w_j

    def _add_rows(self, lower, upper, starts, index, value):
        n_rows = lower.size
        self.h.addRows(n_rows, lower, upper, int(index.size), starts[:-1].astype(np.int32),
                       index.astype(np.int32), value.astype(np.float64))

    def _set_integer(self, cols):
        cols = np.asarray(cols, dtype=np.int32)
        self.h.changeColsIntegrality(cols.size, cols, np.array([self.hs.HighsVarType.kInteger] * cols.size))

    def _integral(self, classes):
        new = [c for c in classes if not self.integral_class[c]]
        if new:
            self.integral_class[new] = True
            self._set_integer((np.arange(self.F)[:, None] * self.C + np.array(new)[None, :]).ravel())

    def forbid(self, c1: int, c2: int, common: np.ndarray) -> None:
        """Forbid classes c1 < c2 to share a set: a no-good cut for `common`, then the full disjunction."""
        self._integral([c1, c2])
        inf = self.hs.kHighsInf
        if (c1, c2) not in self.nogood:
            self.nogood.add((c1, c2))
            cols = np.concatenate([common * self.C + c1, common * self.C + c2])
            self._add_rows(np.array([-inf]), np.array([2.0 * self.prep.k - 1]), np.array([0, cols.size]),
                           cols, np.ones(cols.size))
            return
        if (c1, c2) in self.full_cols:
            raise SolverError(f"classes {c1} and {c2} collide despite the disjunction (numerical trouble?)")
        F = self.F
        w0 = self.full_cols[(c1, c2)] = self.h.getNumCol()
        self.h.addVars(F, np.zeros(F), np.ones(F))
        self._set_integer(np.arange(w0, w0 + F))
        w = w0 + np.arange(F)
        j = np.arange(F)
        # w_j - E_j,c1 <= 0 ; w_j + E_j,c2 <= 1 ; sum_j w_j >= 1
        self._add_rows(np.full(F, -inf), np.zeros(F), np.arange(0, 2 * F + 1, 2),
                       np.column_stack([w, j * self.C + c1]).ravel(), np.tile([1.0, -1.0], F))
        self._add_rows(np.full(F, -inf), np.ones(F), np.arange(0, 2 * F + 1, 2),
                       np.column_stack([w, j * self.C + c2]).ravel(), np.ones(2 * F))
        self._add_rows(np.array([1.0]), np.array([inf]), np.array([0, F]), w, np.ones(F))

    def vector(self, selected: np.ndarray, assignment: np.ndarray) -> np.ndarray:
        """The model's column values for a solution of the final problem (distinct classes)."""
        x = np.zeros(self.h.getNumCol())
        E = np.zeros((self.F, self.C))
        E[selected] = assignment.T
        x[: self.s0] = E.ravel()
        x[self.s0 + selected] = 1.0
        x[self.y0: self.y0 + self.P] = x[self.s0 + self.prep.pair_i] * x[self.s0 + self.prep.pair_j]
        for (c1, c2), w0 in self.full_cols.items():
            diff = (E[:, c1] > 0.5) & (E[:, c2] < 0.5)
            x[w0 + np.flatnonzero(diff)[:1]] = 1.0
        return x

    def objective_of(self, selected: np.ndarray, assignment: np.ndarray) -> float:
        """The MILP's objective (its cost vector and linearised products) for a solution."""
        return float(self.cost @ self.vector(selected, assignment)[: self.cost.size])

    def start_from(self, selected: np.ndarray, assignment: np.ndarray) -> None:
        """Warm start with a feasible solution of the final problem."""
        sol = self.hs.HighsSolution()
        sol.col_value = list(self.vector(selected, assignment))
        sol.value_valid = True
        self.h.setSolution(sol)

    def extract(self):
        """(selected, assignment) of the last run's incumbent: classes with continuous E take their
        top-k of the selection (the LP optimum), the others their E."""
        x = np.asarray(self.h.getSolution().col_value)
        if x.size < self.y0:
            return None
        s = x[self.s0: self.y0]
        selected = np.sort(np.argsort(-s, kind="stable")[: self.prep.n])
        E = x[: self.s0].reshape(self.F, self.C)[selected]      # n x C
        assignment = topk_assignment(self.prep.a[selected], self.prep.k)
        fixed = np.flatnonzero(self.integral_class)
        if fixed.size:
            assignment[fixed] = topk_assignment(E[:, fixed], self.prep.k)
        return selected, assignment


def solve(problem: Problem, prep: Prepared, log: SolveLog) -> Solution:
    hs = _import_highspy()
    t0 = time.perf_counter()
    time_limit = float(problem.option("time_limit", math.inf))
    model = Model(prep, log)
    h = model.h
    h.setOptionValue("mip_rel_gap", float(problem.option("mip_gap", DEFAULT_MIP_GAP)))
    if problem.option("threads") is not None:
        h.setOptionValue("threads", int(problem.option("threads")))
    h.setOptionValue("random_seed", int(problem.option("seed", 0)))
    log(f"highs: {h.getNumCol()} columns, {h.getNumRow()} rows, built in {time.perf_counter() - t0:.2f}s")

    rounds, status, bound = 0, "heuristic", math.inf
    best = None
    while True:
        remaining = time_limit - (time.perf_counter() - t0)
        if remaining <= 0:
            status = "time_limit"
            break
        h.setOptionValue("time_limit", float(remaining) if math.isfinite(remaining) else hs.kHighsInf)
        rounds += 1
        h.run()
        ms = h.getModelStatus()
        info = h.getInfo()
        log(f"highs round {rounds}: {h.modelStatusToString(ms)} objective {info.objective_function_value:.6f} "
            f"bound {info.mip_dual_bound:.6f} nodes {info.mip_node_count}")
        if ms not in (hs.HighsModelStatus.kOptimal, hs.HighsModelStatus.kTimeLimit,
                      hs.HighsModelStatus.kInterrupt, hs.HighsModelStatus.kSolutionLimit):
            raise SolverError(f"HiGHS ended with status {h.modelStatusToString(ms)}")
        if math.isfinite(info.mip_dual_bound):
            bound = min(bound, info.mip_dual_bound)
        extracted = model.extract() if info.primal_solution_status == 2 else None
        if extracted is None:
            status = "time_limit"
            break
        selected, assignment = extracted
        groups = duplicate_groups(assignment)
        feasible = distinct_assignment(prep.a[selected], prep.k)[0] if groups else assignment
        value = model.objective_of(selected, feasible)
        if best is None or value > best[0]:
            best = value, selected, feasible
        if ms != hs.HighsModelStatus.kOptimal:
            status = "time_limit"
            break
        if not groups:
            status = "optimal"
            break
        pairs = duplicate_pairs(groups)
        for c1, c2 in pairs:
            model.forbid(c1, c2, selected[assignment[c1]])
        log(f"highs: {len(groups)} duplicate groups -> {len(pairs)} pair constraints")
        model.start_from(best[1], best[2])
    if best is None:
        raise SolverError(f"HiGHS found no solution within the time limit of {time_limit:g}s; "
                          "raise time_limit or use backend='fast'")
    value, selected, assignment = best
    return Solution(selected, assignment, value, bound=bound, status=status)
