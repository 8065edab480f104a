"""Graceful stop on SIGTERM / SIGUSR1 (SLURM preemption, torchrun shutdown, `scancel --signal`), in every stage.

The stage runner installs one `StopRequest` for the whole run (`stop_requests`); its handler only records the
signal. Where the run then stops depends on what is running:
* a training phase: the trainer asks every rank at each optimizer step whether any rank received a signal (a
  tiny host-side all-reduce), then all ranks checkpoint together and raise `Preempted` (resume on rerun);
* any other stage (statistics, evaluation, reports): the streamed passes over the data call `stop_point()` at
  every batch boundary, which raises `Preempted` at once; the stage writes nothing half-done (its files are
  written atomically at its end, and it is not marked finished), so the rerun redoes it from the start;
* between stages: the runner checks (on every rank alike) before it starts the next stage.
The CLI turns `Preempted` into `PREEMPTED_EXIT_CODE`, which SLURM scripts use to decide on `scontrol requeue`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Iterator

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
PREEMPTED_EXIT_CODE = 75
_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """A stop signal ended the run at a safe point; the message says what was saved. The CLI turns it into
    PREEMPTED_EXIT_CODE."""

    def __init__(self, message: str, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def _cause(signum: int | None) -> str:
    return (f"stopped by {signal.Signals(signum).name}" if signum is not None
            else "stopped because another rank received SIGTERM/SIGUSR1")


def at_checkpoint(stage: str, checkpoint: str, step: int, signum: int | None) -> Preempted:
    return Preempted(f"{_cause(signum)} during stage {stage}: stopped at a checkpoint at step {step} "
                     f"({checkpoint}); rerun the same command to resume", checkpoint)


def without_checkpoint(stage: str, signum: int | None, detail: str = "") -> Preempted:
    return Preempted(f"{_cause(signum)} during stage {stage}; no checkpoint for this stage, it restarts on rerun"
                     + (f" ({detail})" if detail else ""))


class StopRequest:
    """Install handlers in `__enter__`, restore the previous ones in `__exit__`.

    `stage` is the stage running now (named in messages); `checkpointing` is true while a trainer handles the
    request itself at its next step (then `stop_point` leaves it alone, e.g. in the trainer's evaluation)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.stage = "?"
        self.checkpointing = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only; a run in another thread is not stopped
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


_active: StopRequest | None = None


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """The run's StopRequest: the one already installed (the runner's), else a new one for this block."""
    global _active
    if _active is not None:
        yield _active
        return
    with StopRequest() as stop:
        _active = stop
        try:
            yield stop
        finally:
            _active = None


def stop_point() -> None:
    """A batch boundary of a pass that keeps no checkpoint: raise `Preempted` if a stop signal arrived.

    A local decision (no collective): a pass's ranks may run different numbers of batches. The signal reaches
    every rank (SLURM, torchrun forward it); a rank still waiting in a collective for one that left fails
    there, and the runner reports that as stopped too."""
    stop = _active
    if stop is not None and stop.requested and not stop.checkpointing:
        raise without_checkpoint(stop.stage, stop.signum)
