"""Persistent jobs: one directory per job, solved by a subprocess per job, recovered after a restart.

    workdir/jobs/<job id>/problem.npz   the submitted problem (with its options)
                          state.json    queued | running | done | failed | cancelled, timestamps, solves,
                                        result_sha256 (digest of result.npz once checked)
                          result.npz    written atomically by the worker once validated
                          log.txt       the worker's log (progress lines of long solves)

The job id is problem hash + options hash, so a resubmitted problem maps to the same directory:
a solved one is answered from disk at once, a queued or running one is not started twice. A cached
result is served only while its bytes match the digest recorded when it was checked; a missing or damaged
one is dropped and the job solved again, never served.
A subprocess per job isolates crashes and memory, keeps highspy/gurobipy out of the server
process, and dies with the server (PR_SET_PDEATHSIG) so that a restart can simply re-queue.
Cancelling a job kills its worker. Finished jobs are removed by age and by total size (`prune`), at start
and after every job, so the workdir cannot grow without end.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from .limits import ServiceLimits
from .problem import Problem
from .result import Result, ResultError, check_selection
from .util import LOGGER_NAME, atomic_write_json

JOB_ID = re.compile(r"^[0-9a-f]{32}-[0-9a-f]{16}$")
PARENT_ENV = "SOLVER_SERVICE_PARENT_PID"
FINISHED = ("done", "failed", "cancelled")
log = logging.getLogger(LOGGER_NAME)


class QueueFull(RuntimeError):
    """`limits.max_queued` jobs are waiting already; the client should try again later."""


def die_with_parent() -> None:
    """In a worker: get SIGKILL when the server dies (Linux), and exit if it is already gone."""
    expected = os.environ.get(PARENT_ENV)
    if not expected or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != int(expected):
        os._exit(3)


def run_job(job_dir: Path) -> int:
    """Body of the worker subprocess: solve problem.npz, write result.npz (validated by solve)."""
    from .solve import solve

    die_with_parent()
    problem = Problem.load(job_dir / "problem.npz")
    result = solve(problem)
    result.save(job_dir / "result.npz")
    return 0


class JobManager:
    def __init__(self, workdir, workers: int = 1, limits: ServiceLimits | None = None):
        self.limits = limits or ServiceLimits()
        self.root = Path(workdir) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.queue: queue.Queue[str] = queue.Queue()
        self.lock = threading.Lock()
        self.workers = workers
        self.threads: list[threading.Thread] = []
        self.running: dict[str, subprocess.Popen] = {}

    # ---- state -------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        if not JOB_ID.match(job_id):
            raise KeyError(job_id)
        return self.root / job_id

    def state(self, job_id: str) -> dict | None:
        try:
            return json.loads((self.job_dir(job_id) / "state.json").read_text())
        except (KeyError, FileNotFoundError):
            return None

    def _update(self, job_id: str, **changes) -> dict:
        state = self.state(job_id) or {"job_id": job_id, "created": time.time(), "solves": 0}
        state.update(changes, updated=time.time())
        atomic_write_json(self.job_dir(job_id) / "state.json", state)
        return state

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for path in self.root.glob("*/state.json"):
            try:
                s = json.loads(path.read_text())["state"]
            except (ValueError, KeyError, OSError):
                continue
            out[s] = out.get(s, 0) + 1
        return out

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Recover jobs left queued or running by a previous process, then start the workers."""
        pending = []
        for path in sorted(self.root.glob("*/state.json")):
            job_id = path.parent.name
            state = self.state(job_id)
            if not state or state.get("state") not in ("queued", "running"):
                continue
            if self._finish_from_disk(job_id):
                continue
            pending.append((state.get("created", 0), job_id))
            self._update(job_id, state="queued", recovered=True)
        for _, job_id in sorted(pending):
            log.info("re-queued job %s after restart", job_id)
            self.queue.put(job_id)
        self.prune()
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"solver-worker-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        for proc in list(self.running.values()):
            proc.kill()

    def cancel(self, job_id: str) -> dict | None:
        """Stop a queued or running job (its worker is killed; a later submit solves it again). Returns
        its state, None for an unknown job; a finished job is left as it is."""
        with self.lock:
            state = self.state(job_id)
            if state is None or state["state"] not in ("queued", "running"):
                return state
            state = self._update(job_id, state="cancelled", finished=time.time(), error="cancelled by a client")
            proc = self.running.get(job_id)
        if proc is not None:
            proc.kill()
            log.info("job %s: cancelled, worker %d killed", job_id, proc.pid)
        return state

    def prune(self) -> list[str]:
        """Remove finished jobs older than `keep_seconds` (since they finished), then the oldest finished
        ones while all job folders together hold more than `keep_bytes`. Queued and running jobs stay."""
        now, removed = time.time(), []
        with self.lock:
            total, finished = 0, []
            for job_dir in self.root.iterdir():
                size = sum(f.stat().st_size for f in job_dir.rglob("*") if f.is_file())
                total += size
                state = self.state(job_dir.name)
                if state and state.get("state") in FINISHED:
                    finished.append((state.get("finished") or state.get("updated", 0.0), job_dir.name, size))
            for when, job_id, size in sorted(finished):
                if now - when <= self.limits.keep_seconds and total <= self.limits.keep_bytes:
                    break
                shutil.rmtree(self.root / job_id, ignore_errors=True)
                total -= size
                removed.append(job_id)
        if removed:
            log.info("retention: removed %d finished jobs (older than %gs or beyond %d bytes in total)",
                     len(removed), self.limits.keep_seconds, self.limits.keep_bytes)
        return removed

    def submit(self, problem: Problem) -> dict:
        """Create or find the job for `problem`; returns its state plus `cached` (answered from disk)."""
        job_id = problem.job_id()
        with self.lock:
            state = self.state(job_id)
            if state and state["state"] == "done" and self._cached_result(job_id, state) is not None:
                return {**state, "cached": True}
            if state and state["state"] in ("queued", "running"):
                return {**state, "cached": False}
            if self.queue.qsize() >= self.limits.max_queued:
                raise QueueFull(f"{self.queue.qsize()} jobs are waiting for a worker (the limit); try again later")
            problem.save(self.job_dir(job_id) / "problem.npz")
            state = self._update(job_id, state="queued", error=None, problem_hash=problem.content_hash(),
                                 options_hash=problem.options_hash(), options=dict(problem.options))
        self.queue.put(job_id)
        return {**state, "cached": False}

    def result_bytes(self, job_id: str) -> tuple[bytes | None, dict | None]:
        """(result.npz bytes, state) of a done job whose result is intact; (None, state) otherwise. A done
        job whose result is missing or damaged is queued to be solved again (its state says so)."""
        with self.lock:
            state = self.state(job_id)
            if not state or state["state"] != "done":
                return None, state
            data = self._cached_result(job_id, state)
            if data is not None:
                return data, state
            state = self._update(job_id, state="queued", error=None, requeued="result missing or damaged")
        self.queue.put(job_id)
        return None, state

    def _cached_result(self, job_id: str, state: dict) -> bytes | None:
        """The bytes of a done job's result.npz if they match the recorded digest (or, for a job recorded
        before digests, pass the full check now); a damaged file is removed. Call with the lock held."""
        path = self.job_dir(job_id) / "result.npz"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            log.warning("job %s: result.npz is missing; solving again", job_id)
            return None
        digest = state.get("result_sha256")
        if digest is not None and hashlib.sha256(data).hexdigest() == digest:
            return data
        if digest is None and self._finish_from_disk(job_id):  # no digest yet: check the file and record one
            return data
        if digest is not None:
            log.warning("job %s: %s does not match its recorded digest (damaged); solving again", job_id, path)
            path.unlink(missing_ok=True)
        return None

    # ---- workers -----------------------------------------------------------------------------
    def _finish_from_disk(self, job_id: str) -> bool:
        """Mark a job done if its result file is present and checks out (loads, expected arrays and dtypes,
        finite objective, the selection constraints of the job's problem), recording the file's digest;
        a damaged file is removed so the job is solved again. (The worker validated the result in full
        before writing it; this catches what happened to the file since.)"""
        job_dir = self.job_dir(job_id)
        path = job_dir / "result.npz"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return False
        try:
            result = Result.from_bytes(data, source=str(path))
            problem = Problem.load(job_dir / "problem.npz")
            check_selection(result.selected, result.assignment, problem.n_all_features, problem.n_classes,
                            problem.n_features, problem.n_per_class)
        except (ResultError, ValueError, OSError) as exc:  # ProblemError is a ValueError
            log.warning("job %s: unusable result (%s); solving again", job_id, exc)
            path.unlink(missing_ok=True)
            return False
        self._update(job_id, state="done", finished=time.time(), objective=result.objective, bound=result.bound,
                     gap=result.gap, backend=result.backend, status=result.status,
                     result_sha256=hashlib.sha256(data).hexdigest())
        return True

    def _work(self) -> None:
        while True:
            job_id = self.queue.get()
            try:
                self._run(job_id)
            except Exception as exc:  # never let a worker thread die
                log.exception("job %s crashed the worker", job_id)
                self._update(job_id, state="failed", error=f"internal error: {exc}")
            try:
                self.prune()
            except OSError:
                log.exception("retention: pruning %s failed", self.root)

    def _run(self, job_id: str) -> None:
        job_dir = self.job_dir(job_id)
        with self.lock:
            state = self.state(job_id)
            if not state or state["state"] != "queued":
                return
            state = self._update(job_id, state="running", started=time.time(), solves=state.get("solves", 0) + 1)
        options = state.get("options") or {}
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        if options.get("threads"):
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env[var] = str(options["threads"])
        # Every job submitted through the service has a time limit (limits.apply); the backend stops itself
        # long before this, which only catches a worker that hangs outside the backend.
        time_limit = float(options.get("time_limit") or self.limits.default_time_limit)
        timeout = 2 * time_limit + 300
        log.info("job %s: solving (attempt %d)", job_id, state["solves"])
        with open(job_dir / "log.txt", "ab") as log_file:
            proc = subprocess.Popen([sys.executable, "-m", "solver_service", "run-job", str(job_dir)],
                                    stdout=log_file, stderr=subprocess.STDOUT, env=env)
            with self.lock:  # registered under the lock: a cancel in between kills it here or in cancel()
                self.running[job_id] = proc
                if self._update(job_id, worker_pid=proc.pid)["state"] == "cancelled":
                    proc.kill()
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
                self._update(job_id, state="failed", finished=time.time(),
                             error=f"worker exceeded {timeout:.0f}s and was killed")
                return
            finally:
                with self.lock:
                    self.running.pop(job_id, None)
                    cancelled = (self.state(job_id) or {}).get("state") == "cancelled"
        if cancelled:
            log.info("job %s: cancelled (worker exit code %s)", job_id, code)
            return
        if code == 0 and self._finish_from_disk(job_id):
            log.info("job %s: done", job_id)
            return
        tail = (job_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-5:]
        self._update(job_id, state="failed", finished=time.time(),
                     error=f"worker exited with code {code}: " + " | ".join(tail))
        log.warning("job %s failed with exit code %s", job_id, code)
