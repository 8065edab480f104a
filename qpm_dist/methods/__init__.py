"""Methods: each one is a list of stages (see qpm_dist.methods.stages)."""

from __future__ import annotations

from typing import Callable

from qpm_dist.config import Config
from qpm_dist.methods import qpm, qsenn, sldd
from qpm_dist.methods.stages import Stage

# name -> factory(config or None) -> stages; the config decides e.g. the number of Q-SENN rounds
METHODS: dict[str, Callable[[Config | None], list[Stage]]] = {
    "qpm": lambda cfg=None: qpm.stages(),
    "sldd": sldd.stages,
    "qsenn": qsenn.stages,
}


def method_stages(name: str, cfg: Config | None = None) -> list[Stage]:
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name](cfg)
