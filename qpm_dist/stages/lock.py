"""A lock per stage folder, safe on shared file systems, so runs sharing a run folder train a stage once.

Several runs may share one `run.name` (a sweep's array tasks): a stage they all need (the dense model of one
seed) has the same key, hence the same folder. Whoever takes the folder's lock runs the stage; the others wait
and then reuse the finished stage. Without it, every run trained the same model into the same folder and they
broke each other's checkpoint temp folders (issue 18).

The lock is a directory `<run folder>/.locks/<stage folder name>` (mkdir is atomic on NFS and Lustre; flock()
is not reliable on every NFS; outside the run folder's `<stage>-<key>` names, so a lock left by a killed run
never looks like a stage folder) holding `owner.json`: host, pid, SLURM job, a random token and a heartbeat
timestamp that a background thread rewrites every `heartbeat_s`. A lock is stale, and is broken, when its process is dead on this
host, or its heartbeat is older than `stale_s` (a process on another host that died, or a dead node). Across
hosts this compares clocks, so keep `stale_s` well above the clock skew between nodes (NTP keeps it below a
second). A stale lock is broken by renaming it to a unique name (one waiter wins the rename) and checking the
token, so two waiters never both break the same lock and take it twice.

Tunables (environment, seconds): QPM_DIST_LOCK_HEARTBEAT_S (30), QPM_DIST_LOCK_STALE_S (300),
QPM_DIST_LOCK_POLL_S (10, how often a waiter looks again).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

from qpm_dist.utils import log

OWNER = "owner.json"


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name}: expected a number of seconds, got {value!r}") from None
    if seconds <= 0:
        raise ValueError(f"{name}: expected a positive number of seconds, got {value!r}")
    return seconds


def poll_seconds() -> float:
    """How often a run waiting for a stage folder's lock looks again (QPM_DIST_LOCK_POLL_S, default 10 s)."""
    return _env_seconds("QPM_DIST_LOCK_POLL_S", 10.0)


def slurm_job() -> str | None:
    """This process's SLURM job as `scontrol` names it (`<array job>_<task>` for an array task), else None."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def describe(owner: dict | None) -> str:
    """`host/pid/job` of a lock's owner, for log lines."""
    if not owner:
        return "an owner that has not written owner.json yet"
    return f"{owner.get('host')}/pid {owner.get('pid')}/job {owner.get('job') or '-'}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # not a pid we can check (os.kill(-1, 0) would ask about every process)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class StageLock:
    """The lock of one stage folder. `try_acquire()` never blocks; `release()` removes the lock if it is ours."""

    @classmethod
    def of_stage(cls, out_dir: Path) -> "StageLock":
        """The lock of the stage folder `out_dir`."""
        return cls(Path(out_dir).parent / ".locks" / Path(out_dir).name)

    def __init__(self, path: Path, heartbeat_s: float | None = None, stale_s: float | None = None) -> None:
        self.path = Path(path)
        self.heartbeat_s = heartbeat_s or _env_seconds("QPM_DIST_LOCK_HEARTBEAT_S", 30.0)
        self.stale_s = stale_s or _env_seconds("QPM_DIST_LOCK_STALE_S", 300.0)
        self.token: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ------------------------------------------------------------------ reading
    def owner(self) -> dict | None:
        """The holder's owner.json; None if there is no lock or it was just created (owner.json not written)."""
        try:
            return json.loads((self.path / OWNER).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except ValueError:  # cannot happen with atomic writes, but a damaged file must not block forever
            return {}

    def stale_reason(self, owner: dict | None) -> str | None:
        """Why the lock held by `owner` is stale, or None while its holder may be alive."""
        now = time.time()
        if not owner:  # created but owner.json not written yet (or damaged): judge by the folder's age
            try:
                age = now - self.path.stat().st_mtime
            except FileNotFoundError:
                return None
            return f"no owner.json for {age:.0f} s" if age > self.stale_s else None
        if owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1))):
            return f"process {owner.get('pid')} on this host is dead"
        age = now - float(owner.get("heartbeat", 0))
        if age > self.stale_s:
            return f"last heartbeat {age:.0f} s ago (stale after {self.stale_s:.0f} s)"
        return None

    # ------------------------------------------------------------------ taking and giving back
    def try_acquire(self) -> bool:
        """Take the lock if it is free or stale (breaking it, with a warning); False while someone else holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after breaking a stale lock
            try:
                self.path.mkdir()
            except FileExistsError:
                owner = self.owner()
                reason = self.stale_reason(owner)
                if reason is None or not self._break(owner, reason):
                    return False
                continue
            self.token = uuid.uuid4().hex
            self._write_owner()
            self._stop.clear()
            self._beat = threading.Thread(target=self._heartbeat, name=f"lock {self.path.name}", daemon=True)
            self._beat.start()
            return True
        return False

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still ours (it may have been broken as stale)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if self.token is None:
            return
        token, self.token = self.token, None
        if (self.owner() or {}).get("token") != token:
            log.warning("lock %s was taken over by %s while this process held it", self.path,
                        describe(self.owner()))
            return
        gone = self.path.with_name(f"{self.path.name}.released-{token}")
        try:
            self.path.rename(gone)
        except FileNotFoundError:
            return
        shutil.rmtree(gone, ignore_errors=True)

    def _break(self, owner: dict | None, reason: str) -> bool:
        """Move a stale lock aside; True if this process did it and it was the lock judged stale."""
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            self.path.rename(aside)
        except (FileNotFoundError, OSError):
            return False  # another waiter broke it first (or it was released)
        moved = json.loads((aside / OWNER).read_text()) if (aside / OWNER).is_file() else None
        if (moved or {}).get("token") != (owner or {}).get("token"):
            # Between our look and our rename the lock was broken and taken afresh: give it back.
            try:
                aside.rename(self.path)
            except OSError:
                log.warning("lock %s: moved a live lock of %s aside and could not restore it", self.path,
                            describe(moved))
            return False
        log.warning("breaking the stale lock %s of %s: %s", self.path, describe(owner), reason)
        shutil.rmtree(aside, ignore_errors=True)
        return True

    # ------------------------------------------------------------------ heartbeat
    def _write_owner(self) -> None:
        """Write owner.json atomically (temp file + rename) inside the lock folder, never creating the folder:
        a lock broken as stale must not reappear from a late heartbeat."""
        text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "job": slurm_job(),
                           "token": self.token, "heartbeat": time.time()})
        tmp = self.path / f".{OWNER}.{self.token}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path / OWNER)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if (self.owner() or {}).get("token") != self.token:
                log.warning("lock %s was broken or taken over while this process held it (now: %s)", self.path,
                            describe(self.owner()) if self.path.is_dir() else "no lock")
                return
            try:
                self._write_owner()
            except OSError as exc:  # a file system hiccup: try again at the next beat
                log.warning("lock %s: heartbeat not written: %s", self.path, exc)
