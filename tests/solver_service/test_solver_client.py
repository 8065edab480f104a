"""The client against services that misbehave: it gives up within its total wait, and it never returns (or
crashes on) a result it cannot read or that breaks the problem's constraints: both are SolverServiceErrors,
which the trainer treats like an unreachable service (fallback or a clear error)."""

import threading
import time

import numpy as np
import pytest

from fake_solver_service import JOB_ID, FakeSolverService, silent_service
from solver_service import Result, SolverClient, SolverServiceError, solve
from solver_service.synthetic import random_problem


@pytest.fixture(scope="module")
def solved():
    problem = random_problem(12, 5, 6, 2, seed=0)
    return problem, solve(problem, backend="fast", seed=1)


def _call_with_limit(fn, limit: float):
    """(elapsed seconds, exception) of fn(); fails the test if fn is still running after `limit` seconds."""
    out = {}

    def run():
        start = time.monotonic()
        try:
            fn()
        except Exception as exc:
            out["exc"] = exc
        out["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still waiting after {limit} s"
    return out["elapsed"], out.get("exc")


def test_blocked_service_gives_up_within_the_total_wait(solved):
    problem, _ = solved
    with silent_service() as url:  # the trainer's settings: 30 s per request, 5 retries
        client = SolverClient(url, timeout=30, retries=5)
        elapsed, exc = _call_with_limit(lambda: client.solve(problem, wait_timeout=1.0), limit=15)
    assert isinstance(exc, SolverServiceError) and "total wait of 1 s" in str(exc) and url in str(exc)
    assert elapsed < 3


def test_job_that_never_finishes_gives_up_within_the_total_wait(solved):
    problem, _ = solved
    with FakeSolverService(state="queued") as fake:
        client = SolverClient(fake.url, timeout=5)
        elapsed, exc = _call_with_limit(lambda: client.solve(problem, poll_interval=0.05, wait_timeout=1.0), 15)
    assert isinstance(exc, SolverServiceError) and "total wait of 1 s" in str(exc) and JOB_ID in str(exc)
    assert elapsed < 3


def test_unreadable_result_is_a_service_error_naming_the_job(solved):
    problem, result = solved
    data = result.to_bytes()
    with FakeSolverService(result=data[: len(data) // 2]) as fake:
        with pytest.raises(SolverServiceError, match=f"result of job {JOB_ID} from {fake.url}: unreadable"):
            SolverClient(fake.url, timeout=5).solve(problem, wait_timeout=10)


def test_client_rejects_a_result_violating_the_constraints(solved):
    problem, result = solved
    wrong = Result(**{**vars(result), "assignment": result.assignment.copy()})
    wrong.assignment[0, :] = True  # class 0 gets all n features instead of k = 2
    with FakeSolverService(result=wrong.to_bytes()) as fake:
        with pytest.raises(SolverServiceError, match=f"job {JOB_ID} at .*rejected its result.*class 0 has 6"):
            SolverClient(fake.url, timeout=5).solve(problem, wait_timeout=10)
        again = SolverClient(fake.url, timeout=5).solve(problem, wait_timeout=10, validate=False)
    np.testing.assert_array_equal(again.assignment, wrong.assignment)  # validate=False returns it as is


def test_result_being_solved_again_is_waited_for(solved, caplog):
    problem, result = solved
    with FakeSolverService(result=result.to_bytes(), conflicts=2) as fake:
        got = SolverClient(fake.url, timeout=5).solve(problem, poll_interval=0.01, wait_timeout=10)
        assert fake.conflicts == 0
    np.testing.assert_array_equal(got.assignment, result.assignment)
    assert "HTTP 409: solving again; waiting for the job again" in caplog.text


def test_cancelled_job_is_an_error_at_once(solved):
    problem, _ = solved
    with FakeSolverService(state="cancelled") as fake:
        client = SolverClient(fake.url, timeout=5)
        elapsed, exc = _call_with_limit(lambda: client.solve(problem, poll_interval=0.05, wait_timeout=10), 15)
    assert isinstance(exc, SolverServiceError) and f"job {JOB_ID} at {fake.url} cancelled" in str(exc)
    assert elapsed < 2
