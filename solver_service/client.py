"""HTTP client for the solver service (stdlib only, so the trainer needs nothing extra).

Every request is retried with exponential backoff on connection errors, timeouts and 5xx answers;
submitting is idempotent (the job id is a content hash), so retrying a POST is safe. `solve` has one total
wait shared by its requests, retry pauses and polls, so a service that accepts connections but never answers,
or a job that stays queued, cannot hold the caller forever. Whatever the service returns is parsed and checked
before it is used: a result that is unreadable or breaks the problem's constraints is a SolverServiceError.
"""
from __future__ import annotations

import http.client
import json
import logging
import math
import socket
import time
import urllib.error
import urllib.request

from .problem import Problem
from .result import Result, ResultError


log = logging.getLogger("solver_service.client")


class SolverServiceError(RuntimeError):
    """The service could not be reached, refused a request, gave up, or answered with an unusable result;
    the message names the URL (and the job). `http_status` is the HTTP code of a refused request (4xx),
    None otherwise."""

    def __init__(self, message: str, http_status: int | None = None):
        super().__init__(message)
        self.http_status = http_status


class _Deadline:
    """The total wait of one `solve`, shared by its requests, retry pauses and polls."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.end = math.inf if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()


_NO_DEADLINE = _Deadline(None)


class SolverClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5, max_backoff: float = 30.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff

    def _out_of_time(self, deadline: _Deadline, doing: str) -> SolverServiceError:
        return SolverServiceError(f"gave up on the solver service at {self.url} after the total wait of "
                                  f"{deadline.seconds:g} s ({doing})")

    def _request(self, method: str, path: str, body: bytes | None = None,
                 deadline: _Deadline = _NO_DEADLINE) -> bytes:
        url = self.url + path
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        attempts = self.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                if delay >= deadline.remaining():
                    raise self._out_of_time(deadline, f"{method} {url}: {last}")
                log.warning("solver service %s: %s; retrying in %.1f s (attempt %d of %d)", url, last, delay,
                            attempt + 1, attempts)
                time.sleep(delay)
            timeout = min(self.timeout, deadline.remaining())
            if timeout <= 0:
                raise self._out_of_time(deadline, f"{method} {url}" + (f": {last}" if last else ""))
            request = urllib.request.Request(url, data=body, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")
                try:
                    detail = json.loads(detail).get("error", detail)
                except (ValueError, AttributeError):
                    pass
                if exc.code < 500:
                    raise SolverServiceError(f"{method} {url} failed with HTTP {exc.code}: {detail}",
                                             http_status=exc.code) from None
                last = f"HTTP {exc.code}: {detail}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout,
                    http.client.HTTPException) as exc:
                last = str(getattr(exc, "reason", exc)) or type(exc).__name__
        raise SolverServiceError(f"could not reach the solver service at {url} after {attempts} attempts "
                                 f"(last error: {last})")

    def _json(self, method: str, path: str, body: bytes | None = None, deadline: _Deadline = _NO_DEADLINE) -> dict:
        data = self._request(method, path, body, deadline)
        try:
            return json.loads(data)
        except ValueError:
            raise SolverServiceError(f"{method} {self.url}{path}: expected a JSON answer, got {data[:80]!r}") from None

    def health(self) -> dict:
        return self._json("GET", "/health")

    def submit(self, problem: Problem | bytes, **options) -> dict:
        """Submit a problem (options override those inside it); returns the job's state record."""
        if isinstance(problem, (bytes, bytearray)):
            problem = Problem.from_bytes(bytes(problem))
        return self._json("POST", "/jobs", problem.with_options(**options).to_bytes())

    def status(self, job_id: str) -> dict:
        return self._json("GET", f"/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        """Stop a queued or running job; returns its state record."""
        return self._json("POST", f"/jobs/{job_id}/cancel", b"")

    def result(self, job_id: str, deadline: _Deadline = _NO_DEADLINE) -> Result:
        """The job's result, parsed; an unreadable one is a SolverServiceError naming the job and URL."""
        data = self._request("GET", f"/jobs/{job_id}/result", deadline=deadline)
        try:
            return Result.from_bytes(data, source=f"result of job {job_id} from {self.url}")
        except ResultError as exc:
            raise SolverServiceError(str(exc)) from exc

    def log(self, job_id: str) -> str:
        return self._request("GET", f"/jobs/{job_id}/log").decode(errors="replace")

    def solve(self, problem: Problem, poll_interval: float = 1.0, wait_timeout: float | None = None,
              validate: bool = True, **options) -> Result:
        """Submit, wait until the job is done, fetch and (by default) re-check the result locally against the
        problem. Everything together takes at most `wait_timeout` seconds (None: no total limit)."""
        problem = problem.with_options(**options)
        deadline = _Deadline(wait_timeout)
        state = self._json("POST", "/jobs", problem.to_bytes(), deadline)
        job_id = state["job_id"]
        while True:
            while state["state"] not in ("done", "failed", "cancelled"):
                if poll_interval >= deadline.remaining():
                    raise self._out_of_time(deadline, f"job {job_id} still {state['state']}")
                time.sleep(poll_interval)
                state = self._json("GET", f"/jobs/{job_id}", deadline=deadline)
            if state["state"] in ("failed", "cancelled"):
                raise SolverServiceError(f"job {job_id} at {self.url} {state['state']}: {state.get('error')}")
            try:
                result = self.result(job_id, deadline)
                break
            except SolverServiceError as exc:
                if exc.http_status != 409:  # 409: the service found the result missing or damaged and
                    raise                   # solves the job again; wait for it
                log.warning("%s; waiting for the job again", exc)
                state = {"job_id": job_id, "state": "queued"}
        if validate:
            from .validate import validate_result

            try:
                validate_result(problem, result)
            except ResultError as exc:
                raise SolverServiceError(f"job {job_id} at {self.url}: rejected its result: {exc}") from exc
        return result
