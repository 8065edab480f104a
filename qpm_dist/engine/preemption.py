"""Graceful stop on SIGTERM / SIGUSR1 (SLURM preemption, torchrun shutdown, `scancel --signal`).

The handler only records the request; the trainer asks every rank at each optimizer step whether any
rank received one (a tiny host-side all-reduce), then all ranks checkpoint together and leave with
`PREEMPTED_EXIT_CODE`, which SLURM scripts use to decide on `scontrol requeue`.
"""

from __future__ import annotations

import signal
from types import FrameType

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
PREEMPTED_EXIT_CODE = 75
_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised after the checkpoint was written; the CLI turns it into PREEMPTED_EXIT_CODE."""

    def __init__(self, checkpoint: str, signum: int | None) -> None:
        cause = (f"stopped by {signal.Signals(signum).name}" if signum is not None
                 else "stopped because another rank received SIGTERM/SIGUSR1")
        super().__init__(f"{cause}; resume from {checkpoint}")
        self.checkpoint = checkpoint


class StopRequest:
    """Install handlers in `__enter__`, restore the previous ones in `__exit__`."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
