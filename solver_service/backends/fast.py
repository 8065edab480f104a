"""`fast`: a deterministic local-search heuristic with an LP-dual upper bound, for any problem size.

Structure used: for a fixed selection S the best assignment of a class (ignoring uniqueness) is its
top-k features of S, so the search runs over S only, with the relaxed objective

    f(S) = sum_c top-k_{j in S} a_jc  +  sum_{j in S} b_j  -  sum_{i<j in S} R~_ij.

Single swaps (i in S out, j not in S in) are evaluated all at once: with t_c and t'_c the k-th and
(k+1)-th best values of class c in S, swapping i for j changes class c by
max(t'_c, a_jc) - a_ic if i is among c's top-k, else by max(0, a_jc - t_c). Summed over classes:

    delta(i, j) = G_j + sum_{c: i in top_c} [max(t'_c, a_jc) - max(0, a_jc - t_c) - a_ic]
    with G_j = sum_c max(0, a_jc - t_c),

i.e. one F x C pass plus an (F x C) @ (C x n) product for the whole F x n swap matrix, computed
in float32 (3x faster; move values themselves are always recomputed exactly in float64).

Phases: (1) greedy and penalty-free-clique starts, best-improvement descent, then tabu search:
every iteration makes the best swap that is not tabu (a removed feature may not come back, an added
one may not leave, for a few iterations; a swap reaching a new best is always allowed), restarting
from the best selection with a random perturbation when it stalls. (2) Uniqueness: the exact value
of S is f(S) minus the optimal deduplication cost (a min-cost matching, see dedup.py). The best
relaxed local optima descend on that exact value, and if deduplication costs anything there, a
second tabu search runs on it. Exact moves are scanned in decreasing relaxed value, an upper bound
of the exact one, so the scan stops once no remaining swap can win. (3) The LP dual bound of
bound.py, started at the class prices of the solution found.

Budgets are counted in iterations, not seconds, so a seed gives the same result on a given machine
(and thread count) however loaded it is; the time limit is only a safety cap, and the log says when
it cut the search short.
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..bound import lp_bound
from ..dedup import cost_lower_bound, distinct_assignment
from ..preprocess import Prepared
from ..problem import Problem
from ..util import SolveLog
from .base import Solution

ITERATIONS = 2000      # tabu-search swaps at effort 1
EXACT_ITERATIONS = 300  # tabu swaps on the exact (deduplicated) value when deduplication costs anything
ELITE = 4              # best distinct relaxed local optima carried into the exact phase
BOUND_ITERATIONS = 300
RCL = 3                # randomised greedy picks among this many best additions


class Context:
    """Read-only data of one solve: values, bias, dense penalty matrix, sizes, tolerances."""

    def __init__(self, prep: Prepared, deadline: float):
        self.a = prep.a
        self.a32 = prep.a.astype(np.float32)  # the swap matrix in float32: 3x faster, ~1e-6 off
        self.b = prep.b
        self.P = prep.penalty_matrix()
        self.n, self.k = prep.n, prep.k
        self.F, self.C = prep.a.shape
        scale = max(1.0, float(np.abs(prep.a).max(initial=0.0)) * self.C)
        self.eps = 1e-9 * scale
        self.slack = 8 * float(np.finfo(np.float32).eps) * scale  # bound on the float32 error of deltas
        self.deadline = deadline
        self.cut_by_time = False

    def out_of_time(self) -> bool:
        if time.perf_counter() > self.deadline:
            self.cut_by_time = True
        return self.cut_by_time


class SwapState:
    """A selection with its relaxed value and what is needed for all swap deltas."""

    def __init__(self, ctx: Context, sel):
        self.ctx = ctx
        self.sel = np.sort(np.asarray(sel, dtype=np.int64))
        n, k, C = ctx.n, ctx.k, ctx.C
        a_sel = ctx.a[self.sel]                                   # n x C
        order = np.argsort(-a_sel, axis=0, kind="stable")
        cols = np.arange(C)
        self.member = np.zeros((n, C), dtype=bool)                # i among class c's top-k
        self.member[order[:k], cols] = True
        self.t_k = a_sel[order[k - 1], cols]
        self.t_k1 = a_sel[order[k], cols] if n > k else np.full(C, -np.inf)
        self.member_value = np.where(self.member, a_sel, 0.0).sum(axis=1)
        self.pen_to = ctx.P[:, self.sel].sum(axis=1)              # penalty of each j with S
        self.value = float(self.member_value.sum() + ctx.b[self.sel].sum() - 0.5 * self.pen_to[self.sel].sum())
        self.key = self.sel.tobytes()

    def deltas(self) -> np.ndarray:
        """F x n matrix: change of f when sel[i] is replaced by feature j (-inf for j in S), up to
        float32 rounding (ctx.slack); max(t', a) - max(0, a - t) is clip(a, t', t)."""
        ctx = self.ctx
        t_k, t_k1 = self.t_k.astype(np.float32), self.t_k1.astype(np.float32)
        excess = ctx.a32 - t_k                                    # F x C
        np.maximum(excess, 0.0, out=excess)
        gain = excess.sum(axis=1, dtype=np.float64)
        corr = np.clip(ctx.a32, t_k1, t_k) @ self.member.T.astype(np.float32)  # F x n
        lin = ctx.b - self.pen_to
        d = corr - self.member_value[None, :] + (gain + lin)[:, None] - lin[self.sel][None, :]
        d += ctx.P[:, self.sel]
        d[self.sel, :] = -np.inf
        return d

    def swapped(self, pos: int, j: int) -> "SwapState":
        sel = self.sel.copy()
        sel[pos] = j
        return SwapState(self.ctx, sel)


def addition_gains(ctx: Context, sel: np.ndarray) -> np.ndarray:
    """Relaxed gain of adding each feature to a partial selection (-inf for members)."""
    if sel.size < ctx.k:
        assign = ctx.a.sum(axis=1)  # every class still takes every feature
    else:
        t_k = -np.partition(-ctx.a[sel], ctx.k - 1, axis=0)[ctx.k - 1]
        assign = np.maximum(ctx.a - t_k, 0.0).sum(axis=1)
    gains = assign + ctx.b - ctx.P[:, sel].sum(axis=1)
    gains[sel] = -np.inf
    return gains


def greedy_fill(ctx: Context, sel, rng: np.random.Generator | None) -> np.ndarray:
    """Complete a partial selection to n features, each time adding the best (or, with rng, one of
    the RCL best) additions."""
    sel = np.asarray(sel, dtype=np.int64)
    while sel.size < ctx.n:
        gains = addition_gains(ctx, sel)
        if rng is None:
            j = int(np.argmax(gains))
        else:
            m = min(RCL, ctx.F - sel.size)
            j = int(rng.choice(np.argpartition(-gains, m - 1)[:m]))
        sel = np.append(sel, j)
    return sel


class RelaxedMoves:
    """Moves scored by the relaxed value f, all at once from the swap-delta matrix."""

    def value(self, state: SwapState) -> float:
        return state.value

    def best_move(self, state: SwapState, blocked: np.ndarray | None, aspiration: float):
        """Best swap (pos, j, new state, new value) that is not blocked, or blocked but reaching
        more than `aspiration`; None if there is none."""
        d = state.deltas()
        if blocked is not None:
            d = np.where(blocked & (state.value + d <= aspiration), -np.inf, d)
        idx = int(np.argmax(d))
        if not np.isfinite(d.flat[idx]):
            return None
        j, pos = divmod(idx, state.ctx.n)
        nxt = state.swapped(pos, j)
        return pos, j, nxt, nxt.value


class ExactMoves:
    """Moves scored by the exact value: f(S) minus the optimal deduplication cost for S (memoised).

    A neighbour's relaxed value bounds its exact value, so neighbours are scanned in decreasing
    relaxed value and the scan stops once no remaining one can beat the best found (at most
    `scan_limit` exact evaluations per move)."""

    def __init__(self, ctx: Context, scan_limit: int = 256):
        self.ctx = ctx
        self.scan_limit = scan_limit
        self.cache: dict[bytes, float] = {}

    def value(self, state: SwapState) -> float:
        if state.key not in self.cache:
            _, cost = distinct_assignment(self.ctx.a[state.sel], self.ctx.k)
            self.cache[state.key] = state.value - cost
        return self.cache[state.key]

    def best_move(self, state: SwapState, blocked: np.ndarray | None, aspiration: float):
        ctx = state.ctx
        flat = state.deltas().ravel() + (state.value + ctx.slack)  # upper bounds of exact values
        order = np.argsort(-flat, kind="stable")
        best = None
        for idx in order[np.isfinite(flat[order])][: self.scan_limit]:
            if best is not None and flat[idx] <= best[3]:
                break
            j, pos = divmod(int(idx), ctx.n)
            tabu = blocked is not None and blocked[j, pos]
            if tabu and flat[idx] <= aspiration:
                continue
            nxt = state.swapped(pos, j)
            if best is not None and nxt.key not in self.cache and \
                    nxt.value - cost_lower_bound(nxt.member.T, nxt.t_k - nxt.t_k1) <= best[3]:
                continue
            val = self.value(nxt)
            if (not tabu or val > aspiration) and (best is None or val > best[3]):
                best = (pos, j, nxt, val)
        return best


def descend(state: SwapState, moves) -> SwapState:
    """Best-improvement swaps until none improves `moves.value`."""
    ctx = state.ctx
    value = moves.value(state)
    while not ctx.out_of_time():
        move = moves.best_move(state, None, value)
        if move is None or move[3] <= value + ctx.eps:
            break
        state, value = move[2], move[3]
    return state


def perturb(state: SwapState, strength: int, rng: np.random.Generator) -> SwapState:
    """Drop `strength` random features and refill greedily with randomised choices."""
    ctx = state.ctx
    keep = np.delete(state.sel, rng.choice(ctx.n, size=min(strength, ctx.n), replace=False))
    return SwapState(ctx, greedy_fill(ctx, keep, rng))


class Elite:
    """The best few distinct selections seen."""

    def __init__(self, size: int):
        self.size = size
        self.items: dict[bytes, tuple[float, SwapState]] = {}

    def add(self, value: float, state: SwapState) -> None:
        self.items[state.key] = (value, state)
        if len(self.items) > self.size:
            del self.items[min(self.items, key=lambda key: self.items[key][0])]

    def best_first(self) -> list[SwapState]:
        return [s for _, s in sorted(self.items.values(), key=lambda vs: -vs[0])]


def tabu_search(start: SwapState, moves, iterations: int, rng: np.random.Generator, log: SolveLog,
                label: str, elite: Elite | None = None) -> SwapState:
    """Best non-tabu swap every iteration, even if it worsens the value; a swap reaching a new best
    is always allowed. A removed feature may not come back for a few iterations, an added one may
    not leave. After `iterations // 8` iterations without a new best, restart from the best
    selection with a random perturbation. Local optima (no improving swap) go to `elite`."""
    ctx = start.ctx
    state, best = start, start
    value = best_value = moves.value(start)
    frozen = np.full(ctx.F, -1, dtype=np.int64)  # feature may not change side before this iteration
    add_hi = max(2, min(20, (ctx.F - ctx.n) // 2))
    rem_hi = max(2, min(8, ctx.n // 2))
    stall_limit = max(20, iterations // 8)
    last_best = restarts = it = 0
    for it in range(1, iterations + 1):
        if ctx.out_of_time():
            break
        is_frozen = frozen > it
        blocked = is_frozen[:, None] | is_frozen[state.sel][None, :]
        move = moves.best_move(state, blocked, best_value + ctx.eps)
        if move is None:
            frozen[:] = -1  # every move is tabu (tiny instances): forget the tabu list
            continue
        pos, j, nxt, nxt_value = move
        if elite is not None and nxt_value <= value + ctx.eps:
            elite.add(value, state)
        frozen[state.sel[pos]] = it + rng.integers(max(1, add_hi // 3), add_hi + 1)
        frozen[j] = it + rng.integers(max(1, rem_hi // 3), rem_hi + 1)
        state, value = nxt, nxt_value
        if value > best_value + ctx.eps:
            best, best_value, last_best = state, value, it
        elif it - last_best > stall_limit:
            restarts += 1
            state, last_best = perturb(best, 2 + restarts % 6, rng), it
            value = moves.value(state)
            frozen[:] = -1
        log.progress(f"{label}: iteration {it}/{iterations} best {best_value:.6f} current {value:.6f}")
    if elite is not None:
        elite.add(best_value, best)
    log(f"{label}: best {best_value:.6f} after {it} iterations ({restarts} restarts)")
    return best


def solve(problem: Problem, prep: Prepared, log: SolveLog) -> Solution:
    seed = int(problem.option("seed", 0))
    effort = float(problem.option("effort", 1.0))
    time_limit = float(problem.option("time_limit", math.inf))
    t0 = time.perf_counter()
    ctx = Context(prep, t0 + time_limit)
    rng = np.random.default_rng(seed)
    iterations = max(1, round(ITERATIONS * effort))
    exact_iterations = max(1, round(EXACT_ITERATIONS * effort))
    log(f"fast: F={ctx.F} C={ctx.C} n={ctx.n} k={ctx.k} |D|={prep.pair_w.size} seed={seed} "
        f"iterations={iterations} (+{exact_iterations} if deduplication costs) time cap={time_limit:g}s")

    # 1. starts and the relaxed search
    relaxed = RelaxedMoves()
    starts = {"greedy": greedy_fill(ctx, np.zeros(0, dtype=np.int64), None)}
    if prep.clique is not None:
        starts["clique"] = prep.clique
    elite = Elite(ELITE)
    for name, sel in starts.items():
        state = descend(SwapState(ctx, sel), relaxed)
        elite.add(state.value, state)
        log(f"start {name}: {SwapState(ctx, sel).value:.6f} -> {state.value:.6f}")
    best = tabu_search(elite.best_first()[0], relaxed, iterations, rng, log, "tabu", elite)
    t_relaxed = time.perf_counter()

    # 2. uniqueness: exact value = relaxed value - deduplication cost
    exact = ExactMoves(ctx, scan_limit=int(np.clip(4e6 / (ctx.F * ctx.C), 8, 256)))
    tops = elite.best_first()
    costs = [s.value - exact.value(s) for s in tops]
    best = max((descend(s, exact) for s in tops), key=exact.value)
    log(f"exact: best {exact.value(best):.6f} from the {len(tops)} best local optima, whose deduplication "
        f"costs are {', '.join(f'{c:.4g}' for c in costs)}")
    if max(costs) > ctx.eps:
        best = tabu_search(best, exact, exact_iterations, rng, log, "exact tabu")
    assignment, cost = distinct_assignment(ctx.a[best.sel], ctx.k)
    objective = best.value - cost
    t_exact = time.perf_counter()

    # 3. bound
    relaxed_part = objective + 0.5 * float(best.pen_to[best.sel].sum())  # assignment + bias terms
    bound, its = lp_bound(ctx.a, ctx.b, ctx.n, ctx.k, best.t_k, relaxed_part, BOUND_ITERATIONS,
                          max(1.0, ctx.deadline - time.perf_counter()))
    log(f"bound: {bound:.6f} (LP relaxation without penalty and uniqueness) after {its} dual steps; "
        f"{len(exact.cache)} exact evaluations")
    if ctx.cut_by_time:
        log(f"time cap of {time_limit:g}s reached: the search was cut short (result depends on speed)")
    return Solution(
        selected=best.sel,
        assignment=assignment,
        objective=objective,
        bound=bound,
        status="time_limit" if ctx.cut_by_time else "heuristic",
        timings={"relaxed_search": t_relaxed - t0, "exact_search": t_exact - t_relaxed,
                 "bound": time.perf_counter() - t_exact},
    )
