"""Methods: each one is a list of stages (see qpm_dist.methods.stages)."""

from __future__ import annotations

from qpm_dist.methods import qpm
from qpm_dist.methods.stages import Stage

METHODS = {"qpm": qpm.stages}


def method_stages(name: str) -> list[Stage]:
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name]()
