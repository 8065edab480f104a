import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from solver_service import Result, SolverClient, SolverServiceError, solve, validate_result
from solver_service.service import SolverService
from solver_service.synthetic import random_problem, realistic_problem

from job_waits import process_dies, wait_for_state

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


@pytest.fixture
def service(tmp_path):
    svc = SolverService(tmp_path / "work", port=0, token="s3cret", max_bytes=2_000_000).start()
    yield svc
    svc.close()


def test_round_trip_and_cache_hit(service):
    client = SolverClient(service.url, token="s3cret", timeout=10)
    assert client.health()["status"] == "ok"
    p = random_problem(12, 5, 6, 2, seed=0)
    remote = client.solve(p, backend="fast", seed=1, poll_interval=0.1, wait_timeout=60)
    local = solve(p, backend="fast", seed=1)
    np.testing.assert_array_equal(remote.selected, local.selected)
    np.testing.assert_array_equal(remote.assignment, local.assignment)
    assert remote.objective == local.objective and remote.backend == "fast"

    again = client.submit(p, backend="fast", seed=1)  # same problem and options: same job, no solve
    assert again["cached"] is True and again["state"] == "done"
    state = client.status(again["job_id"])
    assert state["solves"] == 1
    assert client.result(again["job_id"]).objective == remote.objective
    other = client.submit(p, backend="fast", seed=2)  # other options: another job
    assert other["job_id"] != again["job_id"] and other["cached"] is False
    assert "backend=fast" in client.log(again["job_id"])


def test_token_size_limit_and_bad_problems_are_refused(service):
    p = random_problem(12, 5, 6, 2, seed=0)
    with pytest.raises(SolverServiceError, match="HTTP 401"):
        SolverClient(service.url, timeout=5).submit(p)
    with pytest.raises(SolverServiceError, match="HTTP 401"):
        SolverClient(service.url, token="wrong", timeout=5).status("0" * 32 + "-" + "0" * 16)
    client = SolverClient(service.url, token="s3cret", timeout=5)
    big = realistic_problem(600, 10, 20, 3, seed=0)  # > 2 MB of float64
    with pytest.raises(SolverServiceError, match="HTTP 413"):
        client.submit(big)
    bad = b"PK not really a zip"
    request = urllib.request.Request(service.url + "/jobs", data=bad, method="POST",
                                     headers={"Authorization": "Bearer s3cret"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 400 and b"problem.npz" in err.value.read()
    with pytest.raises(SolverServiceError, match="HTTP 404"):
        client.status("0" * 32 + "-" + "0" * 16)
    with pytest.raises(SolverServiceError, match="HTTP 404"):
        client.status("../../etc")


def test_client_retries_then_names_the_url(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    calls = []
    real = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    client = SolverClient(f"http://127.0.0.1:{port}", timeout=1, retries=2, backoff=0.01)
    with pytest.raises(SolverServiceError) as err:
        client.health()
    assert len(calls) == 3
    assert f"http://127.0.0.1:{port}/health" in str(err.value) and "after 3 attempts" in str(err.value)


def _start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "solver_service", "-q", "serve", "--port", "0",
                             "--workdir", str(workdir)], env=ENV, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return proc, line.split()[-1]


def test_killed_service_finishes_the_job_after_restart(tmp_path):
    workdir = tmp_path / "work"
    proc, url = _start_server(workdir)
    try:
        client = SolverClient(url, timeout=10)
        # fast with a huge budget and an 8 s cap: the worker is surely running when we kill the server
        p = realistic_problem(200, 60, 20, 3, seed=1)
        job = client.submit(p, backend="fast", effort=1000.0, time_limit=8.0)["job_id"]
        state = wait_for_state(client, job, ("running",), poll=0.1)
        while "worker_pid" not in state or "tabu" not in client.log(job):  # the worker is solving
            time.sleep(0.1)
            state = client.status(job)
        assert state["solves"] == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert process_dies(state["worker_pid"], timeout=1.5), "the worker must die with the server"
        assert not (workdir / "jobs" / job / "result.npz").exists()
        assert not (workdir / "jobs" / job / "result.npz").exists()
        assert json.loads((workdir / "jobs" / job / "state.json").read_text())["state"] == "running"
    finally:
        proc.kill()
    proc, url = _start_server(workdir)  # same workdir: the job is re-queued and solved
    try:
        client = SolverClient(url, timeout=10)
        state = wait_for_state(client, job, ("done", "failed"), timeout=90, poll=0.1)
        assert state["state"] == "done" and state["solves"] == 2 and state.get("recovered") is True
        result = client.result(job)
        validate_result(p, result)
        assert result.status == "time_limit"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def test_cli_solve_writes_a_plain_npz(tmp_path):
    p = random_problem(10, 3, 5, 3, seed=2)
    p.save(tmp_path / "problem.npz")
    out = subprocess.run([sys.executable, "-m", "solver_service", "-q", "solve", str(tmp_path / "problem.npz"),
                          "--backend", "fast", "--out", str(tmp_path / "result.npz")],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    with np.load(tmp_path / "result.npz", allow_pickle=False) as z:
        assert {"selected", "assignment", "objective", "bound", "gap", "assignment_term", "penalty_term",
                "bias_term", "backend", "log"} <= set(z.files)
    validate_result(p, Result.load(tmp_path / "result.npz"))


def _solved_job(service) -> tuple[SolverClient, object, str, Path]:
    client = SolverClient(service.url, token="s3cret", timeout=10)
    p = random_problem(12, 5, 6, 2, seed=0)
    client.solve(p, backend="fast", seed=1, poll_interval=0.05, wait_timeout=60)
    job = client.submit(p, backend="fast", seed=1)["job_id"]
    return client, p, job, service.workdir / "jobs" / job


def test_damaged_cached_result_is_dropped_and_solved_again(service, caplog):
    client, p, job, job_dir = _solved_job(service)
    first = Result.load(job_dir / "result.npz")
    data = bytearray((job_dir / "result.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (job_dir / "result.npz").write_bytes(bytes(data))
    again = client.solve(p, backend="fast", seed=1, poll_interval=0.05, wait_timeout=60)  # not served: re-solved
    np.testing.assert_array_equal(again.selected, first.selected)
    np.testing.assert_array_equal(again.assignment, first.assignment)
    assert client.status(job)["solves"] == 2
    assert "does not match its recorded digest" in caplog.text and job in caplog.text


def test_done_job_whose_result_is_deleted_gets_an_answer_and_is_solved_again(service):
    client, p, job, job_dir = _solved_job(service)
    (job_dir / "result.npz").unlink()
    request = urllib.request.Request(f"{service.url}/jobs/{job}/result", headers={"Authorization": "Bearer s3cret"})
    with pytest.raises(urllib.error.HTTPError) as err:  # before: an empty reply (server traceback)
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 409
    assert "result missing or damaged; solving again" in json.loads(err.value.read())["error"]
    result = client.solve(p, backend="fast", seed=1, poll_interval=0.05, wait_timeout=60)
    validate_result(p, result)
    assert client.status(job)["solves"] == 2


def test_disconnecting_client_is_one_log_line_not_a_traceback(service, capfd, caplog):
    import socket
    import struct

    caplog.set_level("INFO", logger="solver_service")
    port = int(service.url.rsplit(":", 1)[1])
    for _ in range(5):  # send a request, then reset the connection before the answer is read
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    assert SolverClient(service.url, timeout=10).health()["status"] == "ok"  # still serving
    time.sleep(0.2)
    assert "Traceback" not in capfd.readouterr().err
    lines = [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
    assert lines and all("\n" not in line and "GET /health" in line for line in lines)


def test_unexpected_server_error_is_a_json_500_not_an_empty_reply(service, monkeypatch):
    def broken(job_id):
        raise RuntimeError("state store exploded")

    monkeypatch.setattr(service.jobs, "state", broken)
    request = urllib.request.Request(f"{service.url}/jobs/{'0' * 32}-{'0' * 16}",
                                     headers={"Authorization": "Bearer s3cret"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 500 and "state store exploded" in json.loads(err.value.read())["error"]
