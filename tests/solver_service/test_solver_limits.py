"""The service's resource limits: uploads, options, time, connections, retention, the token and TLS."""
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import tracemalloc
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from solver_service import ProblemError, SolverClient, SolverServiceError
from solver_service.cli import main as cli_main
from solver_service.jobs import JobManager
from solver_service.limits import ServiceLimits
from solver_service.problem import normalise_options
from solver_service.service import SolverService
from solver_service.synthetic import random_problem, realistic_problem

from job_waits import process_dies, wait_for_state

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
TOKEN = "s3cret"


def start(tmp_path, **limits) -> SolverService:
    return SolverService(tmp_path / "work", port=0, token=TOKEN, limits=ServiceLimits(**limits)).start()


def post(url: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url + "/jobs", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# ------------------------------------------------------------------------------------------ item 8: uploads


def test_zip_bomb_is_refused_before_it_is_expanded(tmp_path):
    svc = start(tmp_path, max_uncompressed_bytes=8 * 1024 * 1024, max_features=1000)
    try:
        F = 1500  # R alone expands to 18 MB; deflated, the whole upload is about 30 kB
        buf = io.BytesIO()
        np.savez_compressed(buf, A=np.zeros((F, 4)), R=np.zeros((F, F)), b=np.zeros(F), n_features=np.int64(4),
                            n_per_class=np.int64(2))
        body = buf.getvalue()
        assert len(body) < 100_000
        tracemalloc.start()
        try:
            code, message = post(svc.url, body)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert code == 413 and "expand to" in message and "8388608" in message, message
        assert peak < 4 * 1024 * 1024, f"the server allocated {peak} bytes for a refused upload"
        assert not any((tmp_path / "work" / "jobs").iterdir()), "nothing of a refused upload is written"

        small = np.zeros((1200, 4))  # 38 kB of arrays, within the byte limit, but F > max_features
        buf = io.BytesIO()
        np.savez(buf, A=small, R=np.zeros((1, 1)), b=np.zeros(1), n_features=np.int64(4), n_per_class=np.int64(2))
        code, message = post(svc.url, buf.getvalue())
        assert code == 413 and "1200 features" in message and "1000" in message, message
    finally:
        svc.close()


# ---------------------------------------------------------------------------------- item 9: options, time, cancel


def test_options_have_absolute_bounds():
    for options, field in (({"threads": 1_000_000}, "threads"), ({"effort": 1e9}, "effort"),
                           ({"seed": 2 ** 40}, "seed"), ({"time_limit": 1e9}, "time_limit")):
        with pytest.raises(ProblemError, match=field):
            normalise_options(options)
    assert normalise_options({"threads": 8, "effort": 1000.0, "seed": 7, "time_limit": 3600.0})


def test_service_refuses_options_beyond_its_bounds(tmp_path):
    svc = start(tmp_path, max_threads=4, default_time_limit=30.0, max_time_limit=60.0)
    try:
        p = random_problem(12, 5, 6, 2, seed=0)
        code, message = post(svc.url, p.with_options(threads=5).to_bytes())
        assert code == 400 and "threads: 5 exceeds this service's maximum of 4" in message, message
        code, message = post(svc.url, p.with_options(time_limit=61.0).to_bytes())
        assert code == 400 and "time_limit: 61 s exceeds" in message, message
        assert not any((tmp_path / "work" / "jobs").iterdir())
    finally:
        svc.close()


def test_job_without_time_limit_ends_within_the_default(tmp_path):
    svc = start(tmp_path, default_time_limit=1.0)
    try:
        client = SolverClient(svc.url, token=TOKEN, timeout=10)
        p = realistic_problem(200, 60, 20, 3, seed=1)  # effort 1e4: 2e7 tabu iterations, hours without a limit
        submitted = client.submit(p, backend="fast", effort=1e4)
        assert submitted["options"]["time_limit"] == 1.0
        started = time.monotonic()
        state = wait_for_state(client, submitted["job_id"], ("done", "failed"), timeout=60)
        assert state["state"] == "done", state
        assert time.monotonic() - started < 30
        result = client.result(submitted["job_id"])
        assert result.status == "time_limit"  # its best solution, marked as not proven optimal
    finally:
        svc.close()


def test_cancel_stops_a_running_solve_and_the_queue_is_bounded(tmp_path):
    svc = start(tmp_path, max_queued=1)
    try:
        client = SolverClient(svc.url, token=TOKEN, timeout=10)
        p = realistic_problem(200, 60, 20, 3, seed=2)
        job = client.submit(p, backend="fast", effort=1e4, time_limit=600.0)["job_id"]
        state = wait_for_state(client, job, ("running",))
        while "worker_pid" not in state or "tabu" not in client.log(job):
            time.sleep(0.05)
            state = client.status(job)
        waiting = client.submit(p, backend="fast", effort=1e4, time_limit=600.0, seed=1)["job_id"]
        code, message = post(svc.url, p.with_options(seed=2).to_bytes())  # a third job: the queue is full
        assert code == 503 and "1 jobs are waiting" in message, message
        assert client.cancel(waiting)["state"] == "cancelled"
        with pytest.raises(SolverServiceError, match="HTTP 401"):
            SolverClient(svc.url, timeout=5, retries=0).cancel(job)
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        assert cli_main(["-q", "cancel", "--url", svc.url, "--token-file", str(token_file), job]) == 0
        assert process_dies(state["worker_pid"], timeout=5.0), "the worker must stop"
        time.sleep(0.2)  # the worker thread has seen the exit: the state stays cancelled
        assert client.status(job)["state"] == "cancelled"
        with pytest.raises(SolverServiceError, match="HTTP 409"):
            client.result(job)
        with pytest.raises(SolverServiceError, match="HTTP 404"):
            client.cancel("0" * 32 + "-" + "0" * 16)
    finally:
        svc.close()


# ------------------------------------------------------------------------------ item 12: connections, retention


def test_idle_connections_are_closed_and_the_cap_refuses_more(tmp_path):
    svc = start(tmp_path, read_timeout=0.5, max_connections=3)
    host, port = svc.httpd.server_address[:2]
    try:
        idle = [socket.create_connection((host, port), timeout=5) for _ in range(3)]
        with socket.create_connection((host, port), timeout=5) as extra:  # the 4th
            assert extra.recv(100).startswith(b"HTTP/1.1 503")
        started = time.monotonic()
        for s in idle:
            assert s.recv(100) == b"", "an idle connection must be closed by the server"
            s.close()
        assert time.monotonic() - started < 4
        time.sleep(0.1)
        assert SolverClient(svc.url, timeout=5).health()["status"] == "ok"  # the slots are free again
    finally:
        svc.close()


def test_retention_removes_old_jobs_then_the_oldest_beyond_the_size(tmp_path):
    jobs = JobManager(tmp_path, limits=ServiceLimits(keep_seconds=3600.0, keep_bytes=250_000))
    now = time.time()

    def job(name: str, state: str, age: float, size: int) -> str:
        job_id = name * 32 + "-" + name * 16
        jobs.job_dir(job_id).mkdir()
        (jobs.job_dir(job_id) / "result.npz").write_bytes(bytes(size))
        jobs._update(job_id, state=state, finished=now - age)
        return job_id

    old = job("a", "done", 7200, 10)
    old_failed = job("b", "failed", 7200, 10)
    old_queued = job("c", "queued", 7200, 100_000)  # never removed: not finished
    big_older = job("d", "done", 600, 100_000)
    big_newer = job("e", "done", 60, 100_000)
    assert sorted(jobs.prune()) == sorted([old, old_failed, big_older])
    assert sorted(p.name for p in jobs.root.iterdir()) == sorted([old_queued, big_newer])
    assert jobs.prune() == []


# ------------------------------------------------------------------------------------------ item 13: token, TLS


def test_sbatch_passes_no_token_in_argv():
    script = (ROOT / "slurm" / "solver_service.sbatch").read_text()
    assert "--token" not in script
    assert 'SOLVER_SERVICE_TOKEN="$SOLVER_TOKEN" srun' in script


def test_serve_reads_the_token_from_a_file(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    refused = subprocess.run([sys.executable, "-m", "solver_service", "serve", "--port", "0", "--token", "x"],
                             env=ENV, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "unrecognized arguments: --token x" in refused.stderr
    proc = subprocess.Popen([sys.executable, "-m", "solver_service", "-q", "serve", "--port", "0", "--workdir",
                             str(tmp_path / "work"), "--token-file", str(token_file)], env=ENV,
                            stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split()[-1]
        assert "from-a-file" not in " ".join(Path(f"/proc/{proc.pid}/cmdline").read_text().split("\0"))
        with pytest.raises(SolverServiceError, match="HTTP 401"):
            SolverClient(url, token="wrong", timeout=5, retries=0).status("0" * 32 + "-" + "0" * 16)
        with pytest.raises(SolverServiceError, match="HTTP 404"):  # authorised: the job is unknown
            SolverClient(url, token="from-a-file", timeout=5).status("0" * 32 + "-" + "0" * 16)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
def test_tls_with_a_user_named_certificate(tmp_path, monkeypatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True, timeout=60)
    svc = SolverService(tmp_path / "work", port=0, token=TOKEN, tls_cert=str(cert), tls_key=str(key),
                        limits=ServiceLimits(read_timeout=2.0)).start()
    try:
        assert svc.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(svc.url + "/health", timeout=10, context=context) as response:
            assert json.loads(response.read())["status"] == "ok"
        plain = svc.url.replace("https://", "http://")
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(plain + "/health", timeout=10)
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(svc.url + "/health", timeout=10)  # an untrusted certificate is refused
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # how training jobs trust a self-signed certificate
        assert SolverClient(svc.url, token=TOKEN, timeout=10).health()["status"] == "ok"
    finally:
        svc.close()


def test_a_trickling_upload_is_cut_off(tmp_path, monkeypatch):
    import solver_service.service as service_module

    monkeypatch.setattr(service_module, "MIN_UPLOAD_RATE", 1000)  # bytes/s: 2000 bytes may take 0.5 + 2 s
    svc = start(tmp_path, read_timeout=0.5)
    host, port = svc.httpd.server_address[:2]
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(f"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                      f"Content-Length: 2000\r\n\r\n".encode())
            started, answer = time.monotonic(), b""
            while not answer and time.monotonic() - started < 8:
                s.sendall(b"x")  # one byte every 0.1 s: never silent for the read timeout, 100 times too slow
                time.sleep(0.1)
                s.setblocking(False)
                try:
                    answer = s.recv(200)
                except BlockingIOError:
                    pass
                s.setblocking(True)
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert time.monotonic() - started < 4
    finally:
        svc.close()
