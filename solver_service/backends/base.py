"""What a backend receives and returns; `solve.finalize` turns a Solution into a checked Result."""
from __future__ import annotations

import dataclasses
import math

import numpy as np


DEFAULT_MIP_GAP = 1e-6  # exact backends: relative gap at which they stop unless mip_gap is given


class SolverError(RuntimeError):
    """A backend could not produce a solution (missing package, licence, infeasible model...)."""


class BackendUnavailable(SolverError):
    """The backend's package is not installed or cannot be used in this process."""


class LicenceLimitError(SolverError):
    """Gurobi refused the model because the licence it found is size-limited (errno 10010)."""


@dataclasses.dataclass
class Solution:
    selected: np.ndarray          # n feature ids (any order; finalize sorts them with the columns)
    assignment: np.ndarray        # C x n bool, columns in the order of `selected`
    objective: float              # the backend's own value of the solution (checked later; NaN: none)
    bound: float = math.nan       # valid upper bound, NaN if unknown
    status: str = "heuristic"     # "optimal", "time_limit" or "heuristic"
    timings: dict = dataclasses.field(default_factory=dict)
