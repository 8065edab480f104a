"""The sparse head: selection before pooling, frozen binary weights, normalisation, dropout order."""

import numpy as np
import pytest
import torch

from qpm_dist.models.sparse import SparseHead


def head(**kw):
    selection = torch.tensor([2, 0])
    weight = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # 3 classes x 2 selected features
    mean = torch.tensor([1.0, 10.0, 2.0])  # full-length statistics are indexed by the selection
    std = torch.tensor([2.0, 10.0, 0.5])
    return SparseHead(selection, weight, mean, std, **kw)


def test_forward_by_hand():
    h = head(dropout=0.0).eval()
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 0] = 3.0  # feature 0: pooled 3 -> (3 - 1) / 2 = 1
    maps[0, 2] = 1.0  # feature 2: pooled 1 -> (1 - 2) / 0.5 = -2
    out = h(maps)
    assert out.feature_maps.shape == (1, 2, 2, 2)
    torch.testing.assert_close(out.feature_maps[0, 0], maps[0, 2])  # column order = selection order
    torch.testing.assert_close(out.features, torch.tensor([[-2.0, 1.0]]))
    torch.testing.assert_close(out.logits, torch.tensor([[-2.0, -1.0, 1.0]]))


def test_weights_and_statistics_are_frozen_and_no_bias():
    h = head()
    assert not h.weight.requires_grad and not h.mean.requires_grad and not h.std.requires_grad
    assert h.bias is None
    assert [n for n, p in h.named_parameters() if p.requires_grad] == []


def test_dropout_after_normalisation_zeroes_a_unit_reference_order_gives_minus_mean_over_std():
    maps = torch.full((4096, 3, 1, 1), 3.0)  # selected feature 2: mean 2, std 0.5 -> normalised value 2
    torch.manual_seed(0)
    ours = head(dropout=0.5).train()(maps).features[:, 0]
    assert set(ours.tolist()) == {0.0, 4.0}  # dropped: exactly 0; kept: 2 / (1 - p)
    torch.manual_seed(0)
    reference = head(dropout=0.5, dropout_before_norm=True).train()(maps).features[:, 0]
    # spec bug 23: the reference drops the raw pooled value, so a dropped unit becomes -mu/sigma = -4
    assert set(reference.tolist()) == {-4.0, (6.0 - 2.0) / 0.5}


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="3 selected features"):
        SparseHead(torch.tensor([0, 1, 2]), torch.ones(2, 2), torch.zeros(3), torch.ones(3))


def test_tensors_are_contiguous_when_the_solver_gives_a_column_major_assignment():
    """QPM's solver returns the class-feature assignment column-major (Fortran order); a head keeping it strided
    gave DDP checkpoints a non-contiguous weight, and DeepSpeed's broadcast of such a model fails with
    "self.stride(-1) must be 1 to view Float as Byte" (issue 14)."""
    assignment = np.asfortranarray(np.array([[1, 0], [1, 1], [0, 1]], dtype=bool)).astype(np.float32)
    statistics = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).t()  # strided views too
    h = SparseHead(torch.tensor([2, 0]), torch.from_numpy(assignment), statistics[0], statistics[1])
    assert not torch.from_numpy(assignment).is_contiguous()
    assert all(t.is_contiguous() for t in h.state_dict().values())
