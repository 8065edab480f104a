"""Standalone solver for QPM's binary quadratic selection/assignment problem (library, CLI and HTTP service).

    from solver_service import Problem, solve
    result = solve(Problem.load("problem.npz"), backend="auto", time_limit=600, seed=0)

The package never imports torch; solver packages (highspy, gurobipy) are imported only by the backend
that needs them.
"""
from .client import SolverClient, SolverServiceError
from .problem import Problem, ProblemError
from .result import Result, ResultError
from .solve import solve
from .validate import validate_result

__all__ = ["Problem", "ProblemError", "Result", "ResultError", "SolverClient", "SolverServiceError", "solve",
           "validate_result"]
