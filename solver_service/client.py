"""HTTP client for the solver service (stdlib only, so the trainer needs nothing extra).

Every request is retried with exponential backoff on connection errors, timeouts and 5xx answers;
submitting is idempotent (the job id is a content hash), so retrying a POST is safe.
"""
from __future__ import annotations

import json
import logging
import socket
import time
import urllib.error
import urllib.request

from .problem import Problem
from .result import Result


log = logging.getLogger("solver_service.client")


class SolverServiceError(RuntimeError):
    """The service could not be reached or refused a request; the message names the URL."""


class SolverClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5, max_backoff: float = 30.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        url = self.url + path
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        attempts = self.retries + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                log.warning("solver service %s: %s; retrying in %.1f s (attempt %d of %d)", url, last, delay,
                            attempt + 1, attempts)
                time.sleep(delay)
            request = urllib.request.Request(url, data=body, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")
                try:
                    detail = json.loads(detail).get("error", detail)
                except (ValueError, AttributeError):
                    pass
                if exc.code < 500:
                    raise SolverServiceError(f"{method} {url} failed with HTTP {exc.code}: {detail}") from None
                last = f"HTTP {exc.code}: {detail}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout) as exc:
                last = str(getattr(exc, "reason", exc))
        raise SolverServiceError(f"could not reach the solver service at {url} after {attempts} attempts "
                                 f"(last error: {last})")

    def _json(self, method: str, path: str, body: bytes | None = None) -> dict:
        return json.loads(self._request(method, path, body))

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

    def result(self, job_id: str) -> Result:
        return Result.from_bytes(self._request("GET", f"/jobs/{job_id}/result"))

    def log(self, job_id: str) -> str:
        return self._request("GET", f"/jobs/{job_id}/log").decode(errors="replace")

    def solve(self, problem: Problem, poll_interval: float = 1.0, wait_timeout: float | None = None,
              validate: bool = True, **options) -> Result:
        """Submit, wait until the job is done, fetch and (by default) re-check the result locally."""
        problem = problem.with_options(**options)
        state = self.submit(problem)
        deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
        while state["state"] not in ("done", "failed"):
            if deadline is not None and time.monotonic() > deadline:
                raise SolverServiceError(f"job {state['job_id']} at {self.url} not done after {wait_timeout}s "
                                         f"(state {state['state']})")
            time.sleep(poll_interval)
            state = self.status(state["job_id"])
        if state["state"] == "failed":
            raise SolverServiceError(f"job {state['job_id']} at {self.url} failed: {state.get('error')}")
        result = self.result(state["job_id"])
        if validate:
            from .validate import validate_result

            validate_result(problem, result)
        return result
