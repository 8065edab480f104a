"""What one client may ask of a running service: upload and problem size, solver threads and time.

The service is shared and has one or a few workers, so every request must have a cost known before it
is accepted: the body size from Content-Length, the expanded size and dimensions from the `.npz` member
headers (read without decompressing the data: a 0.5 MB deflated upload can expand to gigabytes), the
threads from the options, and the time from a time limit every job gets (a default when the client
names none, never more than a maximum). `problem.normalise_options` holds the absolute bounds every
solve obeys; these are the narrower ones of one service, set by whoever starts it (`serve --help`).
"""
from __future__ import annotations

import dataclasses
import math
import os

from .problem import Problem, ProblemError, npz_member_headers

MiB = 1024 * 1024


class LimitExceeded(ProblemError):
    """A valid request that is larger than this service accepts (HTTP 413)."""


@dataclasses.dataclass(frozen=True)
class ServiceLimits:
    # Largest request body in bytes; larger uploads are refused with 413 before they are read.
    # An ImageNet-size problem (F = 2048, C = 1000) in float64 is about 50 MB.
    max_bytes: int = 256 * MiB
    # Largest sum of the array sizes of an uploaded problem.npz once expanded (from the member headers).
    # Parsing and checking one upload takes about 2.5 times this in server memory, at most 2 uploads at once.
    max_uncompressed_bytes: int = 256 * MiB
    # Largest number of features F (rows of A; R is F x F: 128 MiB in float64 at 4096) and of classes C.
    max_features: int = 4096
    max_classes: int = 10000
    # Largest `threads` option a job may ask for (default: the cores this process may use, e.g. its SLURM
    # allocation's --cpus-per-task, not all cores of the node).
    max_threads: int = dataclasses.field(default_factory=lambda: len(os.sched_getaffinity(0))
                                         if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    # Time limit in seconds of a job that names none, and the largest one a job may name.
    default_time_limit: float = 3600.0
    max_time_limit: float = 86400.0
    # Seconds a connection may stay silent (idle between requests, or stalled mid-request) before it is closed.
    read_timeout: float = 30.0
    # Jobs waiting for a worker; beyond this a new job is refused with 503 (each holds its problem on disk).
    max_queued: int = 100
    # Connections served at the same time (one thread each); more are answered 503 and closed at once.
    max_connections: int = 64
    # Finished jobs (done, failed, cancelled) are removed when older than keep_seconds since they finished,
    # and the oldest first while all job folders together hold more than keep_bytes.
    keep_seconds: float = 30 * 86400.0
    keep_bytes: int = 50 * 1024 * MiB

    def __post_init__(self):
        for name in ("max_bytes", "max_uncompressed_bytes", "max_features", "max_classes", "max_threads",
                     "max_queued", "max_connections", "keep_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        for name in ("default_time_limit", "max_time_limit", "read_timeout", "keep_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a positive number of seconds, got {value!r}")
        if self.default_time_limit > self.max_time_limit:
            raise ValueError(f"default_time_limit ({self.default_time_limit}) exceeds max_time_limit "
                             f"({self.max_time_limit})")

    def check_upload(self, data: bytes) -> None:
        """Refuse an upload from its `.npz` member headers alone, before any array is expanded."""
        headers = npz_member_headers(data)
        total = sum(math.prod(shape) * dtype.itemsize for shape, dtype in headers.values())
        if total > self.max_uncompressed_bytes:
            raise LimitExceeded("problem.npz", f"its arrays expand to {total} bytes, more than this service's "
                                f"limit of {self.max_uncompressed_bytes} bytes")
        shape = headers.get("A", ((), None))[0]
        if len(shape) == 2:
            F, C = shape
            if F > self.max_features:
                raise LimitExceeded("A", f"{F} features, more than this service's limit of {self.max_features}")
            if C > self.max_classes:
                raise LimitExceeded("A", f"{C} classes, more than this service's limit of {self.max_classes}")

    def apply(self, problem: Problem) -> Problem:
        """The problem with this service's bounds enforced: too many threads or too long a time limit is an
        error (silently solving a different job than asked would be worse); no time limit gets the default."""
        threads = problem.option("threads")
        if threads is not None and threads > self.max_threads:
            raise ProblemError("threads", f"{threads} exceeds this service's maximum of {self.max_threads}")
        time_limit = problem.option("time_limit")
        if time_limit is None:
            return problem.with_options(time_limit=float(self.default_time_limit))
        if time_limit > self.max_time_limit:
            raise ProblemError("time_limit", f"{time_limit:g} s exceeds this service's maximum of "
                               f"{self.max_time_limit:g} s")
        return problem
