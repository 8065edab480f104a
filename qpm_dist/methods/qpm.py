"""QPM as a sequence of stages (specs/qpm.md §1): dense training first; the statistics, solve, sparse
head, fine-tuning, evaluation and report stages follow the same pattern."""

from __future__ import annotations

from qpm_dist.methods.common import DenseStage
from qpm_dist.methods.stages import Stage


def stages() -> list[Stage]:
    return [DenseStage()]
