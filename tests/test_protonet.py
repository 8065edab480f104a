"""PixPNet's prototype head and losses (qpm_dist.models.protonet, qpm_dist.losses.prototypes; specs/pixpnet.md
§1.2, §1.3, §2.2, §7.2, §8 items 2 and 3)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qpm_dist.losses.prototypes import PrototypeLoss
from qpm_dist.models.net import Classifier, ModelOutput
from qpm_dist.models.protonet import (PrototypeHead, PrototypeMatch, add_on_layers, cosine_distances, l2_distances,
                                      log_similarity, nearest_cells)


def tiny_classifier(readout: str = "proto", distance: str = "cosine", classes: int = 3, per_class: int = 2,
                    seed: int = 0) -> Classifier:
    from qpm_dist.models.backbones import TinyResNet

    torch.manual_seed(seed)
    backbone = TinyResNet(width=8, reduced_strides=True)
    head = PrototypeHead(backbone.num_features, classes, per_class, dim=8, distance=distance, readout=readout)
    return Classifier(backbone, head).eval()


def identity_head(prototypes: torch.Tensor, classes: int, distance: str = "cosine") -> PrototypeHead:
    """A head whose latent map is its input (no add-on layers) and whose prototypes are given: hand-built cases."""
    per_class, dim = prototypes.shape[0] // classes, prototypes.shape[1]
    head = PrototypeHead(dim, classes, per_class, dim=dim, distance=distance)
    head.add_on = nn.Identity()
    with torch.no_grad():
        head.prototypes.copy_(prototypes)
    return head


def test_similarity_at_distance_0_1_2_is_the_specs():
    """§8.3: sim(0) = log(1 + 1e6) = 13.8155, sim(1) = log 2, sim(2) = log 1.5, in fp32."""
    sims = log_similarity(torch.tensor([0.0, 1.0, 2.0]))
    assert sims.dtype == torch.float32
    assert sims.tolist() == pytest.approx([math.log(1 + 1e6), math.log(2), math.log(1.5)], rel=1e-6)
    assert sims.tolist() == pytest.approx([13.8155, 0.6931, 0.4055], abs=5e-5)


def test_similarity_is_fp32_even_for_fp16_distances_under_fp16_autocast():
    """§7.2: 1 / (0 + 1e-6) = 1e6 overflows fp16 (max 65504); the activation upcasts first."""
    with torch.autocast("cpu", dtype=torch.float16):
        sims = log_similarity(torch.zeros(2, dtype=torch.float16))
    assert sims.dtype == torch.float32 and sims.tolist() == pytest.approx([13.8155] * 2, abs=5e-5)


def test_proto_logits_are_the_per_class_sums_of_the_max_similarities_exactly():
    """§8.2: logit_c = sum over class c's prototypes of their max similarity over the cells, which is the
    similarity at the argmin cell of the distances."""
    model = tiny_classifier()
    torch.manual_seed(1)
    out = model(torch.randn(4, 3, 32, 32))
    assert isinstance(out, ModelOutput) and isinstance(out.prototypes, PrototypeMatch)
    b, p, h, w = out.feature_maps.shape
    assert (b, p, h, w) == (4, 6, 8, 8) and out.prototypes.distances.shape == (4, 6, 8, 8)
    max_sims = out.feature_maps.flatten(2).amax(dim=2)
    assert torch.equal(out.features, max_sims)
    assert torch.equal(out.logits, max_sims.view(4, 3, 2).sum(dim=2))
    assert torch.equal(out.logits, out.features @ model.head.class_weights().T)  # the metrics' view of the head
    assert torch.equal(out.prototypes.min_distances, out.prototypes.distances.flatten(2).amin(dim=2))
    assert torch.equal(out.features, log_similarity(out.prototypes.min_distances))


def test_linear_readout_starts_at_plus_one_own_class_and_minus_half_others():
    model = tiny_classifier(readout="linear")
    expected = torch.tensor([[1.0, 1.0, -0.5, -0.5, -0.5, -0.5], [-0.5, -0.5, 1.0, 1.0, -0.5, -0.5],
                             [-0.5, -0.5, -0.5, -0.5, 1.0, 1.0]])
    assert torch.equal(model.head.class_weights(), expected)
    out = model(torch.randn(2, 3, 32, 32))
    assert torch.allclose(out.logits, out.features @ expected.T, rtol=0, atol=1e-6)
    sets = model.head.parameter_sets()
    assert sum(len(v) for v in sets.values()) == len(list(model.head.parameters()))  # each parameter in one set
    assert sets["readout"] == [model.head.linear.weight] and tiny_classifier().head.parameter_sets()["readout"] == []


def test_argmin_cell_and_distances_on_a_hand_built_map():
    """Prototype 0 = (1, 0) sits exactly at cells (0, 2) and (1, 2) (a tie: the first, flat index 2, wins);
    prototype 1 = (0, 1) at cell (2, 0) only; every other cell is (1, 1), at cosine distance 1 - 1/sqrt 2."""
    latent = torch.ones(1, 2, 3, 3)
    latent[0, :, 0, 2] = latent[0, :, 1, 2] = torch.tensor([1.0, 0.0])
    latent[0, :, 2, 0] = torch.tensor([0.0, 1.0])
    head = identity_head(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), classes=1)
    out = head(latent)
    assert out.prototypes.min_cells.tolist() == [[2, 6]]
    assert out.prototypes.min_distances.tolist() == [[0.0, 0.0]]
    d = out.prototypes.distances[0, 0]
    assert d[0, 0].item() == pytest.approx(1 - 2**-0.5) and d[2, 0].item() == 1.0  # orthogonal: d = 1
    assert out.features[0].tolist() == pytest.approx([13.8155, 13.8155], abs=5e-5)
    values, cells = nearest_cells(torch.tensor([[[3.0, 1.0], [1.0, 2.0]]]))  # tie between flat cells 1 and 2
    assert values.tolist() == [1.0] and cells.tolist() == [1]


def test_cosine_distance_is_bounded_by_0_and_2_and_l2_is_the_squared_distance():
    latent = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [3.0, 4.0]]).T.reshape(1, 2, 1, 3)
    protos = torch.tensor([[2.0, 0.0]])
    assert cosine_distances(latent, protos).flatten().tolist() == pytest.approx([0.0, 2.0, 1 - 0.6])
    assert l2_distances(latent, protos).flatten().tolist() == pytest.approx([1.0, 9.0, 17.0])
    per_image = protos[None]  # B x M x D: the push's own-class form gives the same numbers
    assert torch.equal(cosine_distances(latent, per_image), cosine_distances(latent, protos))


def test_similarities_are_fp32_under_bf16_autocast():
    """§7.2: the add-on layers run in bf16 under autocast; distances, similarities and logits are fp32 and equal
    the fp32 math applied to the bf16 latent map."""
    model = tiny_classifier()
    images = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    match = out.prototypes
    assert match.latent.dtype == torch.bfloat16
    for tensor in (out.logits, out.feature_maps, out.features, match.distances, match.min_distances):
        assert tensor.dtype == torch.float32
    reference = cosine_distances(match.latent.float(), model.head.prototypes)
    assert torch.equal(match.distances, reference)
    assert torch.equal(out.feature_maps, log_similarity(reference))


def test_add_on_layers_and_their_init():
    """§1.2: regular = conv C->D, ReLU, conv D->D, Sigmoid; bottleneck halves 512 -> 256 -> 192; Kaiming (fan_out)
    for every conv but conv_last (Xavier), zero biases."""
    regular = add_on_layers("regular", 512, 192)
    assert [type(m).__name__ for m in regular] == ["Conv2d", "ReLU", "Conv2d", "Sigmoid"]
    assert list(dict(regular.named_children())) == ["conv1", "relu1", "conv_last", "sigmoid"]
    torch.manual_seed(0)
    bottleneck = add_on_layers("bottleneck", 512, 192)
    convs = [(name, m) for name, m in bottleneck.named_children() if isinstance(m, nn.Conv2d)]
    assert [(n, m.in_channels, m.out_channels) for n, m in convs] == [
        ("conv1", 512, 256), ("conv2", 256, 256), ("conv3", 256, 192), ("conv_last", 192, 192)]
    assert isinstance(bottleneck[-1], nn.Sigmoid) and all(isinstance(bottleneck[i], nn.ReLU) for i in (1, 3, 5))
    for name, conv in convs:
        assert torch.count_nonzero(conv.bias) == 0
        expected = math.sqrt(2 / (2 * conv.out_channels)) if name == "conv_last" else math.sqrt(2 / conv.out_channels)
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.1), name


@pytest.mark.parametrize("kwargs, message", [
    (dict(distance="dot"), "distance must be one of"), (dict(activation="exp"), "activation must be one of"),
    (dict(readout="sparse"), "readout must be one of"), (dict(add_on="deep"), "add-on layers must be one of"),
    (dict(prototypes_per_class=0), "prototypes_per_class (0)"),
])
def test_bad_head_options_stop_with_one_line_naming_the_option(kwargs, message):
    with pytest.raises(ValueError) as err:
        PrototypeHead(8, 2, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_head_is_saved_and_loaded_with_its_options_and_push_sources(tmp_path):
    from qpm_dist.config import ModelConfig
    from qpm_dist.models.io import load_classifier, save_classifier

    model = tiny_classifier(readout="linear", distance="l2")
    model.head.source_sample[:] = torch.arange(6)
    save_classifier(tmp_path / "model.pt", model)
    loaded = load_classifier(tmp_path / "model.pt", ModelConfig(arch="tiny_resnet", tiny_width=8)).eval()
    assert loaded.head.options() == model.head.options() and loaded.head.kind == "prototype"
    assert loaded.head.source_sample.tolist() == list(range(6))
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(images).logits, model(images).logits)


def test_autograd_gradcam_of_a_prototype_model_is_its_class_similarities_at_their_argmin_cells():
    """The pointing metrics' Grad-CAM (no linear form: the autograd path) on the similarity maps: the gradient of
    logit_c reaches each own-class prototype's map at its argmin cell only (weight 1), so the map is the sum of
    class c's max similarities scattered to their argmin cells."""
    from qpm_dist import gradcam

    model = tiny_classifier()
    assert gradcam.linear_form(model.head) is None
    images, labels = torch.randn(3, 3, 32, 32, requires_grad=True), torch.tensor([0, 2, 1])
    cam = gradcam.class_maps(model, images, labels, create_graph=False)
    out = cam.output
    own = model.head.class_identity.T[labels].bool()  # B x P
    expected = torch.zeros(3, 64).scatter_add(1, out.prototypes.min_cells, torch.where(own, out.features, 0.0))
    assert torch.allclose(cam.maps.flatten(1), expected.detach(), rtol=1e-6, atol=0)
    assert (cam.maps > 0).sum() >= 3


def hand_built_output(min_distances: torch.Tensor, logits: torch.Tensor) -> ModelOutput:
    b, p = min_distances.shape
    match = PrototypeMatch(torch.zeros(b, p, 1, 1), min_distances, torch.zeros(b, p, dtype=torch.long), None)
    return ModelOutput(logits, None, None, match)


def test_cluster_and_separation_losses_on_hand_built_distances():
    """§2.2 with 2 classes x 2 prototypes: cluster = mean over images of the nearest own-class prototype's distance;
    separation = - mean of the nearest other-class one; coefficients weight them; 0 leaves a term out."""
    head = PrototypeHead(4, 2, 2, dim=4)
    module = Classifier(nn.Identity(), head)
    min_distances = torch.tensor([[0.2, 0.5, 0.9, 1.5], [0.3, 0.1, 1.2, 0.7]])
    targets = torch.tensor([0, 1])
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    out = hand_built_output(min_distances, logits)
    ce = torch.nn.functional.cross_entropy(logits, targets)
    total, parts = PrototypeLoss()(out, targets, module)  # PixPNet: CE only
    assert torch.equal(total, ce) and torch.equal(parts["ce"], ce)
    assert parts["cluster"].item() == pytest.approx((0.2 + 0.7) / 2)
    assert parts["separation"].item() == pytest.approx(-(0.9 + 0.1) / 2)
    assert parts["avg_separation"].item() == pytest.approx(((0.9 + 1.5) / 2 + (0.3 + 0.1) / 2) / 2)
    total, _ = PrototypeLoss(1.0, 0.8, 0.08)(out, targets, module)
    assert total.item() == pytest.approx(ce.item() + 0.8 * 0.45 - 0.08 * 0.5)


def test_l1_acts_on_the_linear_readouts_other_class_weights_only():
    head = PrototypeHead(4, 2, 2, dim=4, readout="linear")
    module = Classifier(nn.Identity(), head)
    out = hand_built_output(torch.ones(1, 4), torch.zeros(1, 2))
    total, parts = PrototypeLoss(0.0, l1=1e-4)(out, torch.tensor([0]), module)
    assert parts["l1"].item() == pytest.approx(4 * 0.5) and total.item() == pytest.approx(1e-4 * 2.0)
    assert "l1" not in PrototypeLoss()(out, torch.tensor([0]), Classifier(nn.Identity(), PrototypeHead(4, 2, 2, 4)))[1]


def test_the_loss_refuses_a_model_without_prototypes_and_negative_coefficients():
    with pytest.raises(ValueError, match="no prototype distances"):
        PrototypeLoss()(ModelOutput(torch.zeros(1, 2), None, None), torch.tensor([0]),
                        Classifier(nn.Identity(), nn.Identity()))
    with pytest.raises(ValueError, match="cluster coefficient must be >= 0"):
        PrototypeLoss(cluster=-1)
