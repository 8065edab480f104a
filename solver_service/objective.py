"""The objective and the structural facts every backend relies on, computed without any solver.

Orientation convention: an assignment is C x n boolean (rows = classes, columns = the selected
features in ascending id order), as in the reference's `weight.pt`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .preprocess import Prepared


@dataclasses.dataclass(frozen=True)
class Terms:
    assignment: float  # alpha * sum of A over assigned (feature, class) pairs
    penalty: float     # sum of R~ over penalised pairs inside the selection (subtracted)
    bias: float        # sum of b over the selection

    @property
    def total(self) -> float:
        return self.assignment - self.penalty + self.bias


def evaluate(prep: Prepared, selected: np.ndarray, assignment: np.ndarray) -> Terms:
    """Objective terms from first principles: the pair list of D, not any solver's data structure."""
    selected = np.asarray(selected, dtype=np.int64)
    in_sel = np.zeros(prep.n_features_total, dtype=bool)
    in_sel[selected] = True
    both = in_sel[prep.pair_i] & in_sel[prep.pair_j]
    return Terms(
        assignment=float(np.sum(prep.a[selected].T[np.asarray(assignment, dtype=bool)])),
        penalty=float(np.sum(prep.pair_w[both])),
        bias=float(np.sum(prep.b[selected])),
    )


def topk_assignment(a_sel: np.ndarray, k: int) -> np.ndarray:
    """Each class's best k of the selected features: C x n bool from the n x C values a_sel.

    Ties go to the lower column (stable sort), so the result is deterministic.
    """
    order = np.argsort(-a_sel, axis=0, kind="stable")[:k]  # k x C
    out = np.zeros(a_sel.shape[::-1], dtype=bool)
    out[np.arange(a_sel.shape[1])[None, :], order] = True
    return out


def row_keys(mask: np.ndarray) -> np.ndarray:
    """One hashable fixed-size byte string per row of a boolean matrix (exact, not a hash)."""
    packed = np.ascontiguousarray(np.packbits(mask, axis=-1))
    return packed.view(np.dtype((np.void, packed.shape[-1]))).reshape(packed.shape[:-1])


def duplicate_groups(assignment: np.ndarray) -> list[np.ndarray]:
    """Groups (each >= 2 classes, ascending) of classes with identical feature sets: O(C n log C)."""
    if assignment.shape[0] < 2:
        return []
    _, inverse, counts = np.unique(row_keys(assignment), return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    return [np.flatnonzero(inverse == g) for g in np.flatnonzero(counts > 1)]


def duplicate_pairs(groups: list[np.ndarray]) -> list[tuple[int, int]]:
    """All class pairs (c1 < c2) inside the duplicate groups: what uniqueness constraints forbid."""
    return [(int(g[x]), int(g[y])) for g in groups for x in range(g.size) for y in range(x + 1, g.size)]
