"""S_s, the IIS heads' sparsification operator (specs/iis.md §3.1)."""

import pytest
import torch

from qpm_dist.iis.sparsity import kept, reference_kept, sparsify

RATIOS = (0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98)


def test_the_reference_counts_are_the_spec_table():
    assert [reference_kept(200, s) for s in RATIOS] == [199, 179, 139, 99, 59, 19, 9, 3]


def test_exact_counts_keep_the_fraction_one_minus_s():
    assert [kept(200, s) for s in RATIOS] == [200, 180, 140, 100, 60, 20, 10, 4]
    assert kept(200, 1.0) == 0 and reference_kept(200, 1.0) == 0


def test_keeps_the_largest_magnitudes_per_row():
    c = torch.tensor([[0.1, -3.0, 2.0, 0.5, -0.2], [4.0, 0.0, -1.0, 1.5, 0.3]])
    out = sparsify(c, 0.6)  # K = 5: keep 5 - 3 = 2 per row
    assert torch.equal(out, torch.tensor([[0.0, -3.0, 2.0, 0.0, 0.0], [4.0, 0.0, 0.0, 1.5, 0.0]]))
    assert torch.equal(sparsify(c, 0.6, count="reference"), torch.tensor([[0.0, -3.0, 0, 0, 0], [4.0, 0, 0, 0, 0]]))
    assert torch.equal(sparsify(c, 0.0), c) and not sparsify(c, 1.0).any()


def test_ties_still_keep_exactly_the_count():
    out = sparsify(torch.ones(3, 10), 0.5)
    assert out.count_nonzero(dim=1).tolist() == [5, 5, 5]


def test_gradient_passes_survivors_unchanged_and_not_the_mask():
    c = torch.tensor([[1.0, -4.0, 2.0, 0.5]], requires_grad=True)
    (sparsify(c, 0.5) * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    assert torch.equal(c.grad, torch.tensor([[0.0, 2.0, 3.0, 0.0]]))


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="sparsity ratio"):
        sparsify(torch.ones(2, 4), ratio)
