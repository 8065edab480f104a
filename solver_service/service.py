"""HTTP front of the job store (stdlib ThreadingHTTPServer; loopback by default).

    GET  /health               liveness, job counts, installed backends (no token needed)
    POST /jobs                 body = problem .npz bytes -> {"job_id", "state", "cached", ...}
    GET  /jobs/<id>            the job's state record
    GET  /jobs/<id>/result     result .npz bytes once done (409 before)
    GET  /jobs/<id>/log        the worker's log text
    POST /jobs/<id>/cancel     stop a queued or running job -> its state record

With a token, every other endpoint needs `Authorization: Bearer <token>`. What a request may cost is
bounded by `limits.ServiceLimits`: bodies above `max_bytes` are refused with 413 before they are read,
problems whose arrays would expand beyond `max_uncompressed_bytes` (or with too many features/classes)
with 413 before they are expanded, options beyond the service's bounds with 400. A connection silent for
`read_timeout` seconds is closed; beyond `max_connections` at once, new ones get 503 and are closed.
With a certificate and key (`tls`), the service speaks HTTPS only.
"""
from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .backends import installed
from .jobs import JobManager, QueueFull
from .limits import LimitExceeded, ServiceLimits
from .problem import Problem, ProblemError
from .util import LOGGER_NAME, atomic_write_json

DEFAULT_MAX_BYTES = ServiceLimits.max_bytes
UPLOADS_AT_ONCE = 2          # request bodies (and the arrays they expand to) held in memory at the same time
MIN_UPLOAD_RATE = 1024 * 1024  # bytes/s: a slower upload is cut off, so it cannot hold an upload slot for long
log = logging.getLogger(LOGGER_NAME)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def setup(self):
        self.timeout = self.server.limits.read_timeout  # socket timeout of every read: idle clients go
        super().setup()

    def log_message(self, fmt, *args):  # route access logs to logging, not stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    def handle_one_request(self):
        """Every request gets an answer or one log line: a client that went away is logged in one line
        (no traceback), and an unexpected error is logged and answered with a JSON 500 (never an empty reply)."""
        self._replied = False
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError, ssl.SSLError) as exc:  # BrokenPipe/Reset/TLS EOF: the client left
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
            if state is None:  # removed by retention since the state was read
                return self._error(404, f"job {job_id}: its result was removed")
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
        parts = self._route()
        if len(parts) == 3 and parts[0] == "jobs" and parts[2] == "cancel":
            state = self.server.jobs.cancel(parts[1])
            if state is None:
                return self._error(404, f"unknown job {parts[1]}")
            return self._json(200, state)
        if parts != ["jobs"]:
            return self._error(404, f"unknown path {self.path}")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return self._error(411, "Content-Length is required")
        limits = self.server.limits
        if int(length) > limits.max_bytes:
            self.close_connection = True
            return self._error(413, f"body of {length} bytes exceeds the limit of {limits.max_bytes} bytes")
        with self.server.uploads:
            body = self._read_body(int(length))
            if body is None:
                self.close_connection = True
                return self._error(408, f"upload slower than {MIN_UPLOAD_RATE} bytes/s, cut off")
            if len(body) < int(length):
                self.close_connection = True
                return self._error(400, f"body cut short: {len(body)} of {length} bytes")
            try:
                limits.check_upload(body)
                problem = limits.apply(Problem.from_bytes(body))
            except LimitExceeded as exc:
                return self._error(413, f"problem too large: {exc}")
            except ProblemError as exc:
                return self._error(400, f"invalid problem: {exc}")
            del body
            try:
                state = self.server.jobs.submit(problem)
            except QueueFull as exc:
                return self._error(503, str(exc))
        self._json(200 if state["state"] == "done" else 202, state)

    def _read_body(self, length: int) -> bytearray | None:
        """The body, shorter if the client closed early, None if it came slower than MIN_UPLOAD_RATE
        (each read also has the socket's read timeout). Memory grows with what arrived, not with what
        Content-Length announced."""
        deadline = time.monotonic() + self.server.limits.read_timeout + length / MIN_UPLOAD_RATE
        body = bytearray()
        while len(body) < length:
            if time.monotonic() > deadline:
                return None
            chunk = self.rfile.read1(min(length - len(body), 1024 * 1024))
            if not chunk:
                break
            body += chunk
        return body


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most `limits.max_connections` of them; TLS per connection (the
    handshake runs in the connection's thread under the read timeout, so a silent client cannot block
    `accept` for everyone)."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, jobs: JobManager, token: str | None, limits: ServiceLimits,
                 tls: ssl.SSLContext | None = None):
        super().__init__(address, _Handler)
        self.jobs, self.token, self.limits, self.tls = jobs, token, limits, tls
        self.slots = threading.BoundedSemaphore(limits.max_connections)
        self.uploads = threading.BoundedSemaphore(UPLOADS_AT_ONCE)
        self.refused, self.refused_logged = 0, 0.0

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            if time.monotonic() - self.refused_logged > 10:  # a flood must not flood the log too
                self.refused_logged = time.monotonic()
                log.warning("refused %d connections so far (the last from %s): %d connections are open",
                            self.refused, client_address[0], self.limits.max_connections)
            try:
                if self.tls is None:  # over TLS a plain answer would be garbage to the client
                    request.settimeout(1.0)
                    request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                    b"Connection: close\r\nRetry-After: 5\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def finish_request(self, request, client_address):
        if self.tls is None:
            return super().finish_request(request, client_address)
        request.settimeout(self.limits.read_timeout)
        with self.tls.wrap_socket(request, server_side=True) as tls_socket:
            super().finish_request(tls_socket, client_address)

    def handle_error(self, request, client_address):
        # timeouts, resets and TLS handshake failures of single clients are routine; a bug is not
        exc = sys.exc_info()[1]
        if isinstance(exc, (socket.timeout, ConnectionError, ssl.SSLError)):
            log.debug("connection from %s: %s", client_address[0], exc)
        else:
            log.exception("error while serving %s", client_address[0])


class SolverService:
    """The service: job manager + HTTP server. `start()` serves in a background thread (tests),
    `serve_forever()` in the calling thread (CLI)."""

    def __init__(self, workdir, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                 max_bytes: int | None = None, workers: int = 1, limits: ServiceLimits | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None):
        limits = limits or ServiceLimits()
        if max_bytes is not None:
            limits = dataclasses.replace(limits, max_bytes=max_bytes)
        tls = None
        if tls_cert:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                tls.load_cert_chain(tls_cert, tls_key)
            except OSError as exc:  # ssl's own messages do not name the file
                raise OSError(f"TLS certificate {tls_cert} (key {tls_key or 'inside it'}): {exc}") from exc
        self.workdir = Path(workdir)
        self.jobs = JobManager(self.workdir, workers, limits)
        self.httpd = _Server((host, port), self.jobs, token, limits, tls)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{'https' if self.httpd.tls else 'http'}://{host}:{port}"

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
