"""The feature diversity loss against values computed by hand (specs/qpm.md §4.3)."""

import math

import pytest
import torch

from qpm_dist.losses.fdl import feature_diversity_loss

BETA = 0.196


def _maps_and_weights():
    ln3 = math.log(3.0)
    # sample 0: two channels, 1x2 maps; spatial softmaxes [1/4, 3/4] and [3/4, 1/4]; equal means ln3/2
    # sample 1: channel means 0 and 2 -> strengths 0 and 1; both softmaxes uniform [1/2, 1/2]
    maps = torch.tensor([[[[0.0, ln3]], [[ln3, 0.0]]],
                         [[[0.0, 0.0]], [[2.0, 2.0]]]])
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # predicted classes 0 and 1
    weights = torch.tensor([[3.0, -4.0], [1.0, 1.0]])  # class 0 row has norm 5, class 1 row norm sqrt(2)
    return maps, logits, weights


def test_single_sample_by_hand():
    maps, logits, weights = _maps_and_weights()
    loss = feature_diversity_loss(maps[:1], logits[:1], weights, BETA)
    w0, w1 = 3 / (5 + 1e-5), 4 / (5 + 1e-5)
    # position 0: max(w0 * 1/4, w1 * 3/4); position 1: max(w0 * 3/4, w1 * 1/4)
    expected = -BETA * (max(w0 * 0.25, w1 * 0.75) + max(w0 * 0.75, w1 * 0.25))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(-BETA * 1.05, rel=1e-4)


def test_batch_mean_strength_and_prediction_by_hand():
    maps, logits, weights = _maps_and_weights()
    loss = feature_diversity_loss(maps, logits, weights, BETA)
    w0, w1 = 3 / (5 + 1e-5), 4 / (5 + 1e-5)
    first = w1 * 0.75 + w0 * 0.75
    second = 1 / (math.sqrt(2) + 1e-5)  # channel 0 has strength 0; channel 1: weight * (1/2 + 1/2)
    assert loss.item() == pytest.approx(-BETA * (first + second) / 2, rel=1e-6)


def test_weights_detached_by_default_and_attached_on_request():
    maps, logits, weights = _maps_and_weights()
    maps = maps.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    feature_diversity_loss(maps, logits, weights, BETA).backward()
    assert weights.grad is None
    weights.grad = None
    feature_diversity_loss(maps, logits, weights, BETA, detach_weights=False).backward()
    assert torch.count_nonzero(weights.grad) > 0  # the reference's behaviour (spec bug 24)


def test_gradient_reaches_feature_maps():
    maps, logits, weights = _maps_and_weights()
    maps = maps.clone().requires_grad_(True)
    feature_diversity_loss(maps, logits, weights, BETA).backward()
    assert torch.count_nonzero(maps.grad) > 0
