"""Rank 0 solves QPM's problem (in process, or through a solver service); every rank gets the result.

The problem and the result are written to the stage folder (`problem.npz`, `result.npz`), so the solve
can be inspected, re-run on a licence host with `python -m solver_service solve problem.npz`, and is never
repeated for the same inputs (the stage cache; the service additionally caches by problem hash).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np

from qpm_dist import dist
from qpm_dist.config import bounded
from qpm_dist.utils import log

@dataclass
class SolverConfig:
    """How rank 0 solves QPM's selection/assignment problem (`qpm.solver`, see solver_service)."""

    # auto: exact HiGHS MILP for small problems, else the fast local search; gurobi needs a licence.
    backend: Literal["auto", "fast", "highs", "gurobi"] = "auto"
    # The upper bounds are solver_service.problem.OPTION_BOUNDS (the solver refuses more), checked here so that a
    # bad value stops the run at load and not at the solve, after training.
    time_limit: float = bounded(600.0, gt=0, le=7 * 86400.0)  # seconds per solve
    mip_gap: Optional[float] = bounded(None, ge=0, lt=1)  # relative gap (the service's own check: [0, 1))
    threads: Optional[int] = bounded(None, ge=1, le=1024)
    # A running solver service (`python -m solver_service serve`): its URL (http://host:port), or the path of
    # a file holding it (slurm/solver_service.sbatch writes one; the token is read from FILE.token). None
    # solves in process on rank 0. A token can also come from the environment variable SOLVER_SERVICE_TOKEN.
    url: Optional[str] = None
    retries: int = bounded(5, ge=0)  # connection attempts after the first, with exponential backoff
    # Total seconds to wait for the service (submitting, queueing, solving, fetching, retries), so a blocked or
    # overloaded service cannot hold the run forever; > 0. None: 2 * time_limit + 300 (the service's own cap).
    wait_timeout: Optional[float] = bounded(None, gt=0, lt=float("inf"))
    # When the service cannot be reached, does not answer within wait_timeout, or returns an unusable result:
    # solve in process with an open-source backend instead of failing.
    fallback_local: bool = True

    def total_wait(self) -> float:
        return self.wait_timeout if self.wait_timeout is not None else 2 * self.time_limit + 300


OPEN_SOURCE_FALLBACK = "auto"  # without gurobi installed, auto means HiGHS (small) or the fast search (large)


def service_address(url: str) -> tuple[str, str | None]:
    """(URL, token) from `qpm.solver.url`: a URL, or a file holding one (token in FILE.token)."""
    token = os.environ.get("SOLVER_SERVICE_TOKEN") or None
    if url.startswith(("http://", "https://")):
        return url, token
    path = Path(url).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"qpm.solver.url: neither an http(s) URL nor an existing URL file: {url} "
                                "(slurm/solver_service.sbatch writes the file once the service is up)")
    token_file = path.with_name(path.name + ".token")
    if token is None and token_file.is_file():
        token = token_file.read_text().strip() or None
    return path.read_text().strip(), token


def _solve_rank0(A: np.ndarray, R: np.ndarray, b: np.ndarray, n_features: int, n_per_class: int, s: SolverConfig,
                 seed: int, out_dir: Path):
    from solver_service import Problem, SolverClient, SolverServiceError, solve

    options = {"time_limit": s.time_limit, "seed": seed, "mip_gap": s.mip_gap, "threads": s.threads}
    problem = Problem.create(A, R, b, n_features, n_per_class, {k: v for k, v in options.items() if v is not None})
    problem.save(out_dir / "problem.npz")
    if s.url:
        try:
            url, token = service_address(s.url)
            log.info("solve: submitting problem %s to the solver service %s (waiting at most %.0f s)",
                     problem.content_hash()[:12], url, s.total_wait())
            return SolverClient(url, token=token, retries=s.retries).solve(problem, wait_timeout=s.total_wait(),
                                                                           backend=s.backend)
        except (SolverServiceError, FileNotFoundError) as exc:
            if not s.fallback_local:
                log.error("solve: the solver service failed (%s); stopping (qpm.solver.fallback_local=false; "
                          "set it to true to solve in process instead)", exc)
                raise
            log.warning("solve: the solver service failed (%s); solving in process with the open-source "
                        "backends instead (qpm.solver.fallback_local=true)", exc)
            backend = s.backend if s.backend != "gurobi" else OPEN_SOURCE_FALLBACK
            return solve(problem, backend=backend)
    log.info("solve: backend=%s, time limit %.0f s, on rank 0", s.backend, s.time_limit)
    return solve(problem, backend=s.backend)


def solve_and_broadcast(problem: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]], n_features: int,
                        n_per_class: int, cfg: SolverConfig, seed: int, out_dir: Path) -> dict:
    """Rank 0 reads the problem's constants (A, R, b) from `problem()`, solves, writes problem/result files;
    {selected, assignment, summary} is broadcast to all ranks (the other ranks never hold the constants)."""
    payload = None
    if dist.is_main():
        A, R, b = problem()
        result = _solve_rank0(A, R, b, n_features, n_per_class, cfg, seed, out_dir)
        result.save(out_dir / "result.npz")
        (out_dir / "solver.log").write_text(result.log)
        log.info("solve: %s", result.summary())
        payload = {
            "selected": np.asarray(result.selected, dtype=np.int64),
            "assignment": np.asarray(result.assignment, dtype=bool),
            "summary": {"backend": result.backend, "status": result.status, "objective": result.objective,
                        "assignment_term": result.assignment_term, "penalty_term": result.penalty_term,
                        "bias_term": result.bias_term, "bound": result.bound, "gap": result.gap,
                        "seconds": round(result.timings.get("total", float("nan")), 2)},
        }
    return dist.broadcast_object(payload)


def load_solution(out_dir: Path) -> dict:
    """Rank 0 reads a finished solve's result file and broadcasts it (every rank gets identical arrays)."""
    payload = None
    if dist.is_main():
        from solver_service import Result

        result = Result.load(out_dir / "result.npz")
        payload = {"selected": np.asarray(result.selected, dtype=np.int64),
                   "assignment": np.asarray(result.assignment, dtype=bool)}
    return dist.broadcast_object(payload)
