"""`fast`: a deterministic local-search heuristic with a Lagrangian bound, for any problem size.

Structure used: for a fixed selection S the best assignment of a class (ignoring uniqueness) is its
top-k features of S, so the search runs over S only, with the relaxed objective

    f(S) = sum_c top-k_{j in S} a_jc  +  sum_{j in S} b_j  -  sum_{i<j in S} R~_ij.

Single swaps (i in S out, j not in S in) are evaluated all at once: with t_c and t'_c the k-th and
(k+1)-th best values of class c in S, swapping i for j changes class c by
max(t'_c, a_jc) - a_ic if i is among c's top-k, else by max(0, a_jc - t_c). Summed over classes:

    delta(i, j) = G_j + sum_{c: i in top_c} [max(t'_c, a_jc) - max(0, a_jc - t_c) - a_ic]
    with G_j = sum_c max(0, a_jc - t_c),

i.e. one F x C pass plus an (F x C) @ (C x n) product for the whole F x n swap matrix.

Phases: (1) greedy and penalty-free-clique starts, best-improvement swaps, then iterated local
search (remove r random features, re-add greedily with randomisation, descend; r grows while the
search stalls); (2) uniqueness: the exact value of S is f(S) minus the optimal deduplication cost
(a min-cost matching, see dedup.py). Starting from the best relaxed optima, a local search on that
exact value keeps classes distinct; it evaluates swaps in decreasing relaxed delta and stops as soon
as the relaxed value (an upper bound of the exact one) cannot beat the best swap found, and runs
its own kicks when deduplication costs anything. (3) A Lagrangian upper bound (bound.py).

Budgets are counted in kicks, not seconds, so a seed gives the same result on every machine; the
time limit is only a safety cap (the log says when it cut the search short).
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..bound import lagrangian_bound
from ..dedup import distinct_assignment
from ..preprocess import Prepared
from ..problem import Problem
from ..util import SolveLog
from .base import Solution

KICKS = 300            # relaxed iterated-local-search kicks at effort 1
EXACT_KICKS = 100      # kicks on the exact (deduplicated) value when deduplication costs anything
ELITE = 4              # best distinct relaxed local optima carried into the exact phase
BOUND_ITERATIONS = 300
RCL = 3                # randomised greedy picks among this many best additions


class Context:
    """Read-only data of one solve: values, bias, dense penalty matrix, sizes, tolerances."""

    def __init__(self, prep: Prepared, deadline: float):
        self.a = prep.a
        self.b = prep.b
        self.P = prep.penalty_matrix()
        self.n, self.k = prep.n, prep.k
        self.F, self.C = prep.a.shape
        self.eps = 1e-9 * max(1.0, float(np.abs(prep.a).max(initial=0.0)) * self.C)
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
        """F x n matrix: change of f when sel[i] is replaced by feature j (-inf for j in S)."""
        ctx = self.ctx
        excess = np.maximum(ctx.a - self.t_k, 0.0)                # F x C
        gain = excess.sum(axis=1)
        corr = (np.maximum(ctx.a, self.t_k1) - excess) @ self.member.T.astype(np.float64)  # F x n
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


def descend(state: SwapState) -> tuple[SwapState, int]:
    """Best-improvement swaps on the relaxed value until none improves."""
    ctx, steps = state.ctx, 0
    while not ctx.out_of_time():
        d = state.deltas()
        j, pos = np.unravel_index(int(np.argmax(d)), d.shape)
        if d[j, pos] <= ctx.eps:
            break
        state, steps = state.swapped(int(pos), int(j)), steps + 1
    return state, steps


class ExactValue:
    """f(S) minus the optimal deduplication cost for S, memoised per selection."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cache: dict[bytes, float] = {}
        self.calls = 0

    def __call__(self, state: SwapState) -> float:
        if state.key not in self.cache:
            self.calls += 1
            _, cost = distinct_assignment(self.ctx.a[state.sel], self.ctx.k)
            self.cache[state.key] = state.value - cost
        return self.cache[state.key]


def descend_exact(state: SwapState, exact: ExactValue) -> SwapState:
    """Best-improvement swaps on the exact value. The relaxed value of a neighbour bounds its exact
    value, so candidates are scanned in decreasing relaxed delta until none can beat the best."""
    ctx = state.ctx
    current = exact(state)
    while not ctx.out_of_time():
        d = state.deltas()
        flat = d.ravel()
        need = current - state.value + ctx.eps        # relaxed delta needed to possibly improve
        cand = np.flatnonzero(flat > need)
        cand = cand[np.argsort(-flat[cand], kind="stable")]
        best_val, best_state = current + ctx.eps, None
        for idx in cand:
            if state.value + flat[idx] <= best_val or ctx.out_of_time():
                break
            j, pos = divmod(int(idx), ctx.n)
            nxt = state.swapped(pos, j)
            val = exact(nxt)
            if val > best_val:
                best_val, best_state = val, nxt
        if best_state is None:
            break
        state, current = best_state, best_val
    return state


def perturb(state: SwapState, strength: int, rng: np.random.Generator) -> SwapState:
    """Drop `strength` random features and refill greedily with randomised choices."""
    ctx = state.ctx
    keep = np.delete(state.sel, rng.choice(ctx.n, size=strength, replace=False))
    return SwapState(ctx, greedy_fill(ctx, keep, rng))


class Elite:
    """The best few distinct selections seen (by a given value)."""

    def __init__(self, size: int):
        self.size = size
        self.items: dict[bytes, tuple[float, SwapState]] = {}

    def add(self, value: float, state: SwapState) -> None:
        self.items[state.key] = (value, state)
        if len(self.items) > self.size:
            worst = min(self.items, key=lambda key: self.items[key][0])
            del self.items[worst]

    def best_first(self) -> list[SwapState]:
        return [s for _, s in sorted(self.items.values(), key=lambda vs: -vs[0])]


def iterated_search(start: SwapState, kicks: int, rng: np.random.Generator, value, improve,
                    log: SolveLog, label: str, elite: Elite | None = None) -> SwapState:
    """Iterated local search: kick, descend, keep if not worse. The kick grows from 2 features
    while the search stalls and resets on improvement; stops after `kicks` kicks, after kicks/2
    kicks without improvement, or at the time cap."""
    ctx = start.ctx
    best, best_val = start, value(start)
    max_strength = max(2, (ctx.n - ctx.k) // 3) if ctx.n > ctx.k else 1
    stall = 0
    for kick in range(1, kicks + 1):
        if stall >= max(20, kicks // 2) or ctx.out_of_time():
            break
        strength = min(max_strength, 2 + stall // 10, ctx.n)
        cand = improve(perturb(best, strength, rng))
        val = value(cand)
        if elite is not None:
            elite.add(val, cand)
        if val > best_val + ctx.eps:
            best, best_val, stall = cand, val, 0
        else:
            stall += 1
            if val >= best_val - ctx.eps:
                best = cand  # plateau move
        log.progress(f"{label}: kick {kick}/{kicks} best {best_val:.6f} stall {stall}")
    log(f"{label}: best {best_val:.6f} after {kick if kicks else 0} kicks")
    return best


def solve(problem: Problem, prep: Prepared, log: SolveLog) -> Solution:
    seed = int(problem.option("seed", 0))
    effort = float(problem.option("effort", 1.0))
    time_limit = float(problem.option("time_limit", math.inf))
    t0 = time.perf_counter()
    ctx = Context(prep, t0 + time_limit)
    rng = np.random.default_rng(seed)
    kicks = max(1, round(KICKS * effort))
    exact_kicks = max(1, round(EXACT_KICKS * effort))
    log(f"fast: F={ctx.F} C={ctx.C} n={ctx.n} k={ctx.k} |D|={prep.pair_w.size} seed={seed} "
        f"kicks={kicks}+{exact_kicks} time cap={time_limit:g}s")

    # 1. starts and the relaxed search
    starts = {"greedy": greedy_fill(ctx, np.zeros(0, dtype=np.int64), None)}
    if prep.clique is not None:
        starts["clique"] = prep.clique
    elite = Elite(ELITE)
    best = None
    for name, sel in starts.items():
        state, steps = descend(SwapState(ctx, sel))
        elite.add(state.value, state)
        log(f"start {name}: {SwapState(ctx, sel).value:.6f} -> {state.value:.6f} after {steps} swaps")
        if best is None or state.value > best.value:
            best = state
    best = iterated_search(best, kicks, rng, lambda s: s.value, lambda s: descend(s)[0], log, "relaxed", elite)
    t_relaxed = time.perf_counter()

    # 2. uniqueness: exact value = relaxed value - deduplication cost
    exact = ExactValue(ctx)
    candidates = [descend_exact(s, exact) for s in elite.best_first()]
    best = max(candidates, key=exact)
    cost = best.value - exact(best)
    log(f"exact: best {exact(best):.6f} (deduplication cost {cost:.6f}) from {len(candidates)} elite starts")
    if cost > ctx.eps:
        best = iterated_search(best, exact_kicks, rng, exact, lambda s: descend_exact(descend(s)[0], exact),
                               log, "exact")
    assignment, cost = distinct_assignment(ctx.a[best.sel], ctx.k)
    objective = best.value - cost
    t_exact = time.perf_counter()

    # 3. bound
    relaxed_part = objective + 0.5 * float(best.pen_to[best.sel].sum())  # assignment + bias terms
    bound, its = lagrangian_bound(ctx.a, ctx.b, ctx.n, ctx.k, relaxed_part, BOUND_ITERATIONS,
                                  max(1.0, ctx.deadline - time.perf_counter()))
    log(f"bound: {bound:.6f} after {its} subgradient iterations ({exact.calls} exact evaluations)")
    if ctx.cut_by_time:
        log(f"time cap of {time_limit:g}s reached: the search was cut short (result depends on speed)")
    return Solution(
        selected=best.sel,
        assignment=assignment,
        objective=objective,
        bound=max(bound, objective),
        status="time_limit" if ctx.cut_by_time else "heuristic",
        timings={"relaxed_search": t_relaxed - t0, "exact_search": t_exact - t_relaxed,
                 "bound": time.perf_counter() - t_exact},
    )
