"""Grad-CAM: the closed form against autograd and against pytorch-grad-cam (specs/gc_consistency.md §10.4, §13)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qpm_dist import gradcam as G
from qpm_dist.config import ModelConfig
from qpm_dist.models.net import Classifier, build_model
from qpm_dist.models.sparse import SparseHead

SIZES = [(7, 7), (14, 14), (14, 19), (3, 10)]
POOL = {"avg": lambda a: F.adaptive_avg_pool2d(a, 1).flatten(1),
        "max": lambda a: F.adaptive_max_pool2d(a, 1).flatten(1)}


def _features(h, w, seed=0, b=4, k=6):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(b, k, h, w, generator=g).relu()  # post-ReLU like a backbone's output
    weights, bias = torch.randn(5, k, generator=g), torch.randn(5, generator=g)
    labels = torch.randint(0, 5, (b,), generator=g)
    return maps, weights, bias, labels


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("h,w", SIZES)
def test_closed_form_equals_autograd(pooling, h, w):
    maps, weights, bias, labels = _features(h, w)
    maps.requires_grad_(True)
    logits = F.linear(POOL[pooling](maps), weights, bias)
    expected = G.autograd_map(logits, maps, labels)
    got = G.closed_form(maps, weights, labels, pooling)
    assert got.shape == (4, h, w) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(G.normalise(got), G.normalise(expected), atol=1e-6, rtol=0)
    if pooling == "max":  # the sparse map: at most one cell per channel is non-zero
        assert int((got[0] > 0).sum()) <= maps.shape[1]


def _model(head: str = "dense", seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    pooling = "max" if head == "gmp" else "avg"  # gmp: the GC paper's global max pooling (model.pooling=max)
    model = build_model(ModelConfig(arch="tiny_resnet", tiny_width=8, pooling=pooling), num_classes=5)
    if head == "sparse":
        k = model.num_features
        model.head = SparseHead(torch.tensor([3, 0, 7, 12]), torch.randn(5, 4), torch.rand(k), torch.rand(k) + 0.5,
                                bias=torch.randn(5))
    return model.eval()


def _images(h=32, w=40, b=3):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 3, 4][:b])


@pytest.mark.parametrize("head", ["dense", "sparse", "gmp"])
def test_model_maps_closed_form_equal_autograd(head):
    model = _model(head)
    images, labels = _images()
    closed = G.class_maps(model, images, labels, closed=True)
    auto = G.class_maps(model, images, labels, closed=False)
    torch.testing.assert_close(closed.maps, auto.maps, atol=1e-6, rtol=0)
    assert closed.maps.shape[-2:] == (8, 10)  # non-square: 32 x 40 input, stride 4
    assert closed.maps.sum() > 0
    # a layer given by name takes the autograd path on that layer's output (here: the same tensor)
    if head == "dense":
        torch.testing.assert_close(G.class_maps(model, images, labels, layer="backbone").maps, closed.maps,
                                   atol=1e-6, rtol=0)


def test_closed_form_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="closed form needs"):
        G.class_maps(_model(), *_images(), layer="backbone.layer2", closed=True)
    with pytest.raises(ValueError, match="not a module"):
        G.class_maps(_model(), *_images(), layer="nope")


@pytest.mark.parametrize("head", ["dense", "gmp"])
def test_loss_on_map_reaches_fc_weight_through_closed_form_as_through_double_backward(head):
    images, labels = _images()
    grads = []
    for closed in (True, False):
        model = _model(head)
        maps = G.normalise(G.class_maps(model, images, labels, closed=closed).maps)
        target = torch.zeros_like(maps)
        target[..., :2, :] = 1 / (2 * maps.shape[-1])
        ((maps - target) ** 2).sum().backward()
        grads.append(model.head.linear.weight.grad.clone())
    assert grads[0][labels].abs().sum() > 0  # the map depends on the class weights: a non-zero gradient
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_maps_are_fp32_under_bf16_autocast():
    maps, weights, _, labels = _features(14, 19)
    low = maps.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = G.closed_form(low, weights.bfloat16(), labels, "avg")
        cam = G.normalise(got)
    assert got.dtype == cam.dtype == torch.float32
    exact = torch.einsum("bk,bkhw->bhw", weights.bfloat16().double()[labels], low.double()).relu() / (14 * 19)
    torch.testing.assert_close(got.double(), exact, atol=1e-6, rtol=0)  # bf16 arithmetic would be off by ~1e-3
    assert (cam > 0).all()  # the eps of every cell survives (it underflows in fp16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the autograd path: bf16 activations and gradients
        maps = G.class_maps(_model(), *_images(), closed=False).maps
    assert maps.dtype == torch.float32 and maps.sum() > 0


# pytorch-grad-cam (pip grad-cam, a test dependency: requirements/test-nodeps.txt) at feature resolution: its
# min-max scaling and resize to the input size are skipped by reading the map before them (spec §9).
pgc = pytest.importorskip("pytorch_grad_cam", reason="grad-cam not installed (requirements/test-nodeps.txt)")


class LogitsOnly(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(images).logits


def _package_map(cam_class, model, images, labels):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    captured = []

    class Capturing(cam_class):
        def get_cam_image(self, *args, **kwargs):
            cam = super().get_cam_image(*args, **kwargs)
            captured.append(np.maximum(cam, 0))
            return cam

    cam = Capturing(model=LogitsOnly(model), target_layers=[model.backbone])
    try:
        cam(images, targets=[ClassifierOutputTarget(int(c)) for c in labels])
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(captured[0]).float()


@pytest.mark.parametrize("head", ["dense", "gmp"])
def test_against_pytorch_grad_cam(head):
    model = _model(head)
    images, labels = _images()
    ours = G.normalise(G.class_maps(model, images, labels).maps.detach())
    hires = G.normalise(_package_map(pgc.HiResCAM, model, images, labels))
    classic = G.normalise(_package_map(pgc.GradCAM, model, images, labels))
    torch.testing.assert_close(ours, hires, atol=1e-6, rtol=0)
    if head == "dense":  # GAP: the gradient is constant over space, so GradCAM = HiResCAM = ours
        torch.testing.assert_close(ours, classic, atol=1e-6, rtol=0)
    else:  # GMP: GradCAM averages the one-cell gradients into a dense CAM, which is not the map
        assert (ours - classic).abs().max() > 1e-2
