"""The sparsification operator S_s of the interpretable-prediction heads (specs/iis.md §3.1).

Per sample, only the largest-|c| entries of the concept-activation vector c survive; the rest are zeroed. The
head's weights stay dense: it is the *activations* that are sparse. The surviving entries pass their gradient
unchanged; the 0/1 mask is chosen on detached values and carries none.

How many survive: `kept(K, s)` = K − ⌊K·s⌋, i.e. the fraction 1 − s of K. The reference keeps one fewer
(τ = the value at sorted position ⌊K·s⌋, strictly-greater entries kept: K − ⌊K·s⌋ − 1, spec bug 8), fails at
s = 1 and drops every entry tied with τ. `reference_kept` reproduces its count (the spec's kept-count table)
for comparisons with published numbers; `sparsify(..., count="reference")` applies it.

Ties are broken by `torch.topk` on |c| (deterministic for a given input on one device), so exactly `kept`
entries survive even when activations tie, which the reference's threshold rule does not guarantee.
"""

from __future__ import annotations

import math

import torch

COUNTS = ("exact", "reference")


def kept(num_concepts: int, ratio: float) -> int:
    """Entries S_s keeps of `num_concepts` at sparsity ratio `ratio` in [0, 1]: K − ⌊K·s⌋."""
    _check(num_concepts, ratio)
    return num_concepts - math.floor(num_concepts * ratio + 1e-9)


def reference_kept(num_concepts: int, ratio: float) -> int:
    """The reference's count K − ⌊K·s⌋ − 1 (spec §3.1 table, bug 8); 0 at s = 1 where the reference fails."""
    return max(kept(num_concepts, ratio) - 1, 0)


def sparsify(c: torch.Tensor, ratio: float, count: str = "exact") -> torch.Tensor:
    """S_s on the last dimension of `c` (… x K): keep the `kept` largest-|c| entries of every row, zero the rest."""
    if count not in COUNTS:
        raise ValueError(f"sparsity count {count!r}: expected one of {', '.join(COUNTS)}")
    k = c.shape[-1]
    keep = kept(k, ratio) if count == "exact" else reference_kept(k, ratio)
    if keep == k:
        return c
    mask = torch.zeros_like(c, dtype=torch.bool)
    if keep > 0:
        mask.scatter_(-1, c.detach().abs().topk(keep, dim=-1).indices, True)
    return c * mask


def _check(num_concepts: int, ratio: float) -> None:
    if num_concepts < 1:
        raise ValueError(f"sparsity: {num_concepts} concepts; expected at least 1")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"sparsity ratio {ratio}: expected a value in [0, 1]")
