"""Small shared helpers: atomic writes and a log that is both streamed and kept as text."""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

LOGGER_NAME = "solver_service"


def atomic_write_bytes(path, data: bytes) -> None:
    """Write via a temp file in the same directory + os.replace, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class SolveLog:
    """Collects the lines of one solve (kept in the result) and forwards them to the package logger.

    Progress lines of long solves are emitted through `progress`, which rate-limits them.
    """

    def __init__(self, progress_every: float = 5.0):
        self.lines: list[str] = []
        self._t0 = time.perf_counter()
        self._last_progress = -float("inf")
        self._every = progress_every
        self._logger = logging.getLogger(LOGGER_NAME)

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def __call__(self, message: str) -> None:
        line = f"[{self.elapsed():8.2f}s] {message}"
        self.lines.append(line)
        self._logger.info(line)

    def progress(self, message: str) -> None:
        if self.elapsed() - self._last_progress >= self._every:
            self._last_progress = self.elapsed()
            self(message)

    def text(self) -> str:
        return "\n".join(self.lines)
