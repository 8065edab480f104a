"""Waiting in the service tests: for a job to reach a state, and for a worker process to die."""

from __future__ import annotations

import time
from pathlib import Path


def wait_for_state(client, job_id: str, states, timeout: float = 60.0, poll: float = 0.05) -> dict:
    """The job's state record once it is in one of `states`; AssertionError after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = client.status(job_id)
        if state["state"] in states:
            return state
        time.sleep(poll)
    raise AssertionError(f"job {job_id} still {state['state']} after {timeout}s")


def process_dies(pid: int, timeout: float) -> bool:
    """True once `pid` is gone or a zombie waiting for init (dead), False if it still runs after `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False
