"""HTTP front of the job store (stdlib ThreadingHTTPServer; loopback by default).

    GET  /health               liveness, job counts, installed backends (no token needed)
    POST /jobs                 body = problem .npz bytes -> {"job_id", "state", "cached", ...}
    GET  /jobs/<id>            the job's state record
    GET  /jobs/<id>/result     result .npz bytes once done (409 before)
    GET  /jobs/<id>/log        the worker's log text

With a token, every other endpoint needs `Authorization: Bearer <token>`. Bodies above `max_bytes`
are refused with 413 before they are read.
"""
from __future__ import annotations

import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .backends import installed
from .jobs import JobManager
from .problem import Problem, ProblemError
from .util import LOGGER_NAME, atomic_write_json

DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # an ImageNet-size problem in float64 is about 50 MB
log = logging.getLogger(LOGGER_NAME)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # route access logs to logging, not stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    def handle_one_request(self):
        """Every request gets an answer or one log line: a client that went away is logged in one line
        (no traceback), and an unexpected error is logged and answered with a JSON 500 (never an empty reply)."""
        self._replied = False
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError) as exc:  # BrokenPipe/ConnectionReset/...: the client left
            self.close_connection = True
            log.info("client %s disconnected during %r (%s)", self.address_string(),
                     getattr(self, "requestline", ""), type(exc).__name__)
        except Exception as exc:
            self.close_connection = True
            log.exception("request %r from %s failed", getattr(self, "requestline", ""), self.address_string())
            if not self._replied:
                try:
                    self._error(500, f"internal error: {type(exc).__name__}: {exc}")
                except OSError:
                    pass

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self._replied = True
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj) -> None:
        self._send(code, (json.dumps(obj, sort_keys=True) + "\n").encode(), "application/json")

    def _error(self, code: int, message: str) -> None:
        self._json(code, {"error": message})

    def _authorised(self) -> bool:
        token = self.server.token
        if not token:
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return True
        self._error(401, "missing or wrong bearer token")
        return False

    def _route(self):
        parts = [p for p in self.path.split("?")[0].split("/") if p]
        return parts

    def do_GET(self):
        parts = self._route()
        if parts == ["health"]:
            return self._json(200, {"status": "ok", "jobs": self.server.jobs.counts(),
                                    "workers": self.server.jobs.workers,
                                    "backends": {"fast": True, "highs": installed("highspy"),
                                                 "gurobi": installed("gurobipy")}})
        if not self._authorised():
            return
        if len(parts) not in (2, 3) or parts[0] != "jobs":
            return self._error(404, f"unknown path {self.path}")
        job_id = parts[1]
        state = self.server.jobs.state(job_id)
        if state is None:
            return self._error(404, f"unknown job {job_id}")
        if len(parts) == 2:
            return self._json(200, state)
        job_dir = self.server.jobs.job_dir(job_id)
        if parts[2] == "result":
            if state["state"] != "done":
                return self._error(409, f"job {job_id} is {state['state']}, no result yet")
            data, state = self.server.jobs.result_bytes(job_id)
            if data is None:  # missing or damaged: the job is being solved again
                return self._error(409, f"job {job_id} is {state['state']}, no result yet"
                                   + (f" ({state['requeued']}; solving again)" if state.get("requeued") else ""))
            return self._send(200, data, "application/octet-stream")
        if parts[2] == "log":
            path = job_dir / "log.txt"
            return self._send(200, path.read_bytes() if path.exists() else b"", "text/plain; charset=utf-8")
        return self._error(404, f"unknown path {self.path}")

    def do_POST(self):
        if not self._authorised():
            return
        if self._route() != ["jobs"]:
            return self._error(404, f"unknown path {self.path}")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return self._error(411, "Content-Length is required")
        if int(length) > self.server.max_bytes:
            self.close_connection = True
            return self._error(413, f"body of {length} bytes exceeds the limit of {self.server.max_bytes} bytes")
        body = self.rfile.read(int(length))
        try:
            problem = Problem.from_bytes(body)
        except ProblemError as exc:
            return self._error(400, f"invalid problem: {exc}")
        state = self.server.jobs.submit(problem)
        self._json(200 if state["state"] == "done" else 202, state)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, jobs: JobManager, token: str | None, max_bytes: int):
        super().__init__(address, _Handler)
        self.jobs, self.token, self.max_bytes = jobs, token, max_bytes


class SolverService:
    """The service: job manager + HTTP server. `start()` serves in a background thread (tests),
    `serve_forever()` in the calling thread (CLI)."""

    def __init__(self, workdir, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, workers: int = 1):
        self.workdir = Path(workdir)
        self.jobs = JobManager(self.workdir, workers)
        self.httpd = _Server((host, port), self.jobs, token, max_bytes)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def _open(self) -> None:
        self.jobs.start()
        atomic_write_json(self.workdir / "service.json", {"url": self.url})
        log.info("solver service listening on %s (workdir %s)", self.url, self.workdir)

    def start(self) -> "SolverService":
        self._open()
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        self._open()
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        if self.thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()
        self.jobs.stop()
