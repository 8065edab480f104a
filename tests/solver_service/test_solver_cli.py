"""`python -m solver_service` errors: one line naming the file or URL, exit 2 for bad input (missing or invalid
file, a refused request) and 69 when the service is unreachable. In process (`cli.main`): an uncaught exception
fails the test."""

import socket

import pytest

from solver_service.cli import main
from solver_service.service import SolverService

JOB = "0" * 32 + "-" + "0" * 16
EXIT_BAD_INPUT, EXIT_UNAVAILABLE = 2, 69  # the documented exit codes


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = SolverService(tmp_path_factory.mktemp("cli") / "work", port=0, token="s3cret").start()
    yield svc
    svc.close()


def _unused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("solver_service: error: ")
    return err[0]


def test_missing_problem_file(tmp_path, capsys):
    missing = tmp_path / "nope.npz"
    assert main(["-q", "solve", str(missing), "--out", str(tmp_path / "r.npz")]) == EXIT_BAD_INPUT
    assert str(missing) in _error_line(capsys)


def test_invalid_problem_file(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz at all")
    assert main(["-q", "submit", "--url", _unused_url(), str(bad)]) == EXIT_BAD_INPUT
    assert str(bad) in _error_line(capsys)


def test_unreachable_url(capsys):
    url = _unused_url()
    assert main(["-q", "status", "--url", url, "--retries", "0", "--timeout", "2", JOB]) == EXIT_UNAVAILABLE
    assert url in _error_line(capsys)


@pytest.mark.parametrize("token, code", [("wrong", "HTTP 401"), ("s3cret", "HTTP 404")])
def test_refused_request(service, capsys, token, code):
    assert main(["-q", "fetch", "--url", service.url, "--token", token, JOB, "--out", "x.npz"]) == EXIT_BAD_INPUT
    line = _error_line(capsys)
    assert code in line and service.url in line


def test_fetch_wait_outlasts_a_result_the_service_solves_again(service, tmp_path, capsys):
    from solver_service import Result, SolverClient
    from solver_service.synthetic import random_problem

    client = SolverClient(service.url, token="s3cret", timeout=10)
    problem = random_problem(12, 5, 6, 2, seed=0)
    first = client.solve(problem, backend="fast", seed=1, poll_interval=0.05, wait_timeout=60)
    job = client.submit(problem, backend="fast", seed=1)["job_id"]
    (service.workdir / "jobs" / job / "result.npz").unlink()  # done, but its result is gone: 409, solved again
    out = tmp_path / "result.npz"
    assert main(["-q", "fetch", "--url", service.url, "--token", "s3cret", "--wait", job, "--out", str(out)]) == 0
    assert Result.load(out).selected.tolist() == first.selected.tolist()
    assert client.status(job)["solves"] == 2
