"""PixPNet's backbone truncation (spec §1.1), exact receptive fields (spec §1.4, §8.1) and pixel-space mappings
(spec §1.5): brute-force gradient RFs for every cell, the spec's measured table, hand-computed heat maps, bad input."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet50, vgg11
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vgg import cfgs, make_layers

from qpm_dist.config import ModelConfig
from qpm_dist.models import pixel_maps
from qpm_dist.models.backbones import TinyResNet
from qpm_dist.models.pixel_maps import naive_centres, rf_boxes, rf_heat_maps, rf_kernel, upsample_maps
from qpm_dist.models.receptive_fields import (ReceptiveFields, UnsupportedForReceptiveField, backbone_receptive_fields,
                                              receptive_fields)
from qpm_dist.models.truncation import (UnknownLayer, backbone_layers, truncated_backbone,
                                        truncated_backbone_from_config)
from qpm_dist.models.weight_files import BadWeightsFile

# ----------------------------------------------------------------------------------- brute-force receptive fields


def _positive_twin(module: nn.Module) -> nn.Module:
    """A copy in which nothing cancels: max-pools become average pools with the same windows (a max-pool's gradient
    reaches only the window's argmax, its RF is the whole window), weights/biases positive, BN the identity."""
    twin = copy.deepcopy(module).float().eval()
    for name, child in list(twin.named_modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.MaxPool2d):
                assert sub.dilation in (1, (1, 1))
                setattr(child, attr, nn.AvgPool2d(sub.kernel_size, sub.stride, sub.padding, sub.ceil_mode))
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(m.weight.abs() + 0.1)
                if m.bias is not None:
                    m.bias.fill_(0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_(), m.running_var.fill_(1.0), m.weight.fill_(1.0), m.bias.zero_()
    return twin


def brute_force_rf(module: nn.Module, height: int, width: int, in_channels: int = 3) -> np.ndarray:
    """Hz x Wz x H x W bool: the input pixels whose gradient to each output cell (summed over channels) is non-zero."""
    twin = _positive_twin(module)
    x = torch.ones(1, in_channels, height, width, requires_grad=True)
    out = twin(x)
    hz, wz = out.shape[-2:]
    # one backward pass per cell, batched: grad_outputs[h * Wz + w] selects all channels of cell (h, w)
    select = torch.eye(hz * wz, dtype=out.dtype).reshape(hz * wz, 1, 1, hz, wz).expand(-1, *out.shape)
    (grads,) = torch.autograd.grad(out, x, grad_outputs=select, is_grads_batched=True)
    return (grads.abs().sum(dim=(1, 2)) > 0).reshape(hz, wz, height, width).numpy()


def assert_matches_brute_force(module: nn.Module, height: int, width: int, in_channels: int = 3) -> ReceptiveFields:
    rf = receptive_fields(module, height, width)
    seen = brute_force_rf(module, height, width, in_channels)
    assert rf.grid == seen.shape[:2]
    assert rf.input_size == (height, width)
    for h in range(rf.grid[0]):
        for w in range(rf.grid[1]):
            y0, y1, x0, x1 = rf.bounds[h, w]
            expected = np.zeros((height, width), dtype=bool)
            expected[y0:y1, x0:x1] = True
            assert (seen[h, w] == expected).all(), f"cell ({h}, {w}): computed {rf.bounds[h, w]}, brute force differs"
    return rf


class _Stem(nn.Module):
    """A stem conv, then a residual block with a strided 1x1 downsample branch."""

    def __init__(self, block: nn.Module, in_ch: int = 3, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, width, 3, stride=2, padding=1)
        self.block = block

    def forward(self, x):
        return self.block(torch.relu(self.conv(x)))


class _Branches(nn.Module):
    """first(x) + second(x): the second branch's RF contains the first's (identity first: the union must not just
    keep its first operand), or the two overlap without nesting (the union is their bounding box)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.first(x) + self.second(x)


def _downsample(in_ch: int, out_ch: int, stride: int = 2) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))


@pytest.mark.parametrize("name, module, size", [
    ("conv stack: padding, strides, max-pool, odd non-square input",
     nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 5, stride=2, padding=2),
                   nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(4, 2, 3)), (23, 17)),
    ("rectangular kernels, stride per axis, 'same' padding with an even kernel",
     nn.Sequential(nn.Conv2d(3, 4, (3, 1), stride=(2, 1), padding=(1, 0)), nn.Conv2d(4, 4, 4, padding="same"),
                   nn.Conv2d(4, 2, (1, 5), stride=(1, 3), padding=(0, 2))), (13, 20)),
    ("ceil-mode max-pool, average pool, adaptive pool with uneven windows",
     nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True), nn.AvgPool2d(3, 1, padding=1),
                   nn.AdaptiveAvgPool2d((3, 4))), (19, 22)),
    ("residual BasicBlock with a strided 1x1 downsample",
     _Stem(BasicBlock(4, 8, stride=2, downsample=_downsample(4, 8))), (21, 26)),
    ("residual Bottleneck (stride in the 3x3) with a strided 1x1 downsample",
     _Stem(Bottleneck(4, 2, stride=2, downsample=_downsample(4, 8))), (18, 15)),
    ("union: a 1x1 branch plus a 3x3 branch",
     _Branches(nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 3, padding=1)), (7, 9)),
    ("union: overlapping, not nested (cols [x-1, x+2) and [x, x+3), same rows)",
     _Branches(nn.Conv2d(3, 2, 3, padding=1),
               nn.Sequential(nn.Conv2d(3, 2, (3, 2), padding="same"), nn.Conv2d(2, 2, (1, 2), padding="same"))),
     (8, 11)),
])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_rf_of_small_stacks_equals_brute_force_for_every_cell(name, module, size):
    assert_matches_brute_force(module, *size)


@pytest.mark.parametrize("arch, layer, size", [
    ("tiny_resnet", "layer3", (17, 22)),  # BasicBlocks with strided 1x1 downsample, reduced strides
    pytest.param("resnet18", "layer2", (45, 38), marks=pytest.mark.slow),  # torchvision's stem, max-pool, downsample
    pytest.param("vgg11", "maxpool3", (30, 26), marks=pytest.mark.slow),
])
def test_rf_of_real_truncated_backbones_equals_brute_force(arch, layer, size):
    with torch.device("meta"):
        meta = truncated_backbone(arch, layer, reduced_strides=True, tiny_width=4)
    module = truncated_backbone(arch, layer, reduced_strides=True, tiny_width=4)
    rf = assert_matches_brute_force(module, *size)
    # tracing never needs weights: the meta module gives the same
    assert receptive_fields(meta, *size).bounds.tolist() == rf.bounds.tolist()
    assert backbone_receptive_fields(arch, layer, True, *size).bounds.tolist() == rf.bounds.tolist()


# ------------------------------------------------------------------------------------------ the spec's table

# spec §1.4, measured with the reference at 224 x 224: grid, mean / min / max RF area %, centre and corner cell side.
SPEC_TABLE = [
    ("vgg11_bn", "maxpool4", 14, 8.31, 3.69, 9.77, 70, 43),
    ("vgg11_bn", "maxpool5", 7, 31.35, 16.50, 44.84, 150, 91),
    ("vgg16_bn", "maxpool3", 28, 3.49, 1.35, 3.86, 44, 26),
    ("vgg16_bn", "maxpool4", 14, 15.74, 6.70, 19.93, 100, 58),
    ("vgg16_bn", "maxpool5", 7, 52.49, 29.66, 89.57, 212, 122),
    ("resnet18", "layer2", 28, 15.45, 4.98, 19.53, 99, 50),
    ("resnet18", "layer3", 14, 51.71, 22.39, 88.73, 211, 106),
    ("resnet18", "layer4", 7, 99.24, 94.71, 100.00, 224, 218),
    ("resnet50", "layer2", 28, 13.31, 4.22, 16.50, 91, 46),
    ("resnet50", "layer3", 14, 69.85, 35.79, 100.00, 224, 134),
    ("resnet50", "layer4", 7, 98.73, 91.27, 100.00, 224, 214),
]


@pytest.mark.parametrize("arch, layer, grid, mean, lo, hi, centre, corner", SPEC_TABLE)
def test_spec_rf_table_at_224(arch, layer, grid, mean, lo, hi, centre, corner):
    s = backbone_receptive_fields(arch, layer, False, 224, 224).summary()
    assert s["grid"] == (grid, grid)
    assert (round(s["mean_pct"], 2), round(s["min_pct"], 2), round(s["max_pct"], 2)) == (mean, lo, hi)
    assert s["centre"] == (centre, centre) and s["corner"] == (corner, corner)


def test_resnet50_layer3_at_448_and_the_cache():
    backbone_receptive_fields.cache_clear()
    rf = backbone_receptive_fields("resnet50", "layer3", False, 448, 448)
    assert rf.grid == (28, 28) and round(rf.summary()["mean_pct"], 1) == 25.7  # spec §1.4, last line
    assert backbone_receptive_fields("resnet50", "layer3", False, 448, 448) is rf
    with pytest.raises(ValueError):
        rf.rows[0, 0] = 5  # shared through the cache: read-only


def test_grid_matches_the_forward_output_and_reduced_strides():
    for arch, layer, reduced, size in [("resnet18", "layer4", True, (64, 40)), ("resnet18", "layer4", False, (64, 40)),
                                       ("vgg11_bn", "conv1", False, (33, 17)), ("tiny_resnet", "conv1", False, (9, 8))]:
        with torch.device("meta"):  # shapes only
            module = truncated_backbone(arch, layer, reduced, tiny_width=4)
            out = module(torch.zeros(1, 3, *size))
        assert backbone_receptive_fields(arch, layer, reduced, *size).grid == tuple(out.shape[-2:])
        assert out.shape[1] == module.num_features


# ------------------------------------------------------------------------------------------------- truncation


def test_truncation_layers_and_outputs_equal_the_full_backbone():
    assert backbone_layers("resnet50") == ("conv1", "maxpool", "layer1", "layer2", "layer3", "layer4")
    assert backbone_layers("vgg16_bn")[-1] == "maxpool5" and backbone_layers("tiny_resnet")[-1] == "layer3"
    x = torch.randn(2, 3, 40, 36)
    full = resnet18(weights=None).eval()
    cut = truncated_backbone("resnet18", "layer2", state=full.state_dict()).eval()
    assert list(cut._modules) == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2"]
    assert cut.num_features == 128
    with torch.device("meta"):
        assert list(truncated_backbone("resnet18", "conv1")._modules) == ["conv1", "bn1", "relu"]
        assert list(truncated_backbone("resnet50", "maxpool")._modules) == ["conv1", "bn1", "relu", "maxpool"]
    tiny = TinyResNet(width=4).eval()
    stem = truncated_backbone("tiny_resnet", "conv1", tiny_width=4, state=tiny.state_dict()).eval()
    net = nn.Sequential(OrderedDict(features=make_layers(cfgs["A"]))).eval()  # torchvision's VGG-11 features
    vgg_state = {**net.state_dict(), "classifier.0.weight": torch.zeros(2, 2)}  # the classifier is ignored
    vgg_cut = truncated_backbone("vgg11", "maxpool5", state=vgg_state).eval()
    with torch.no_grad():
        torch.testing.assert_close(stem(x), tiny.relu(tiny.bn1(tiny.conv1(x))))
        torch.testing.assert_close(cut(x), full.layer2(full.layer1(full.maxpool(full.relu(full.bn1(full.conv1(x)))))))
        torch.testing.assert_close(vgg_cut(x), net.features(x))
        torch.testing.assert_close(truncated_backbone("vgg11", "conv1", state=vgg_state).eval()(x),
                                   net.features[:2](x))
    assert vgg_cut.num_features == 512


def test_truncated_backbone_from_config_loads_the_weights_file(tmp_path):
    full = TinyResNet(width=4, reduced_strides=False).eval()
    path = tmp_path / "tiny.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, path)
    cfg = ModelConfig(arch="tiny_resnet", reduced_strides=False, tiny_width=4, weights=str(path))
    cut = truncated_backbone_from_config(cfg, "layer3").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(cut(x), full(x))
    assert set(cut.state_dict()) == set(full.state_dict())


def _meta_state(builder) -> dict[str, torch.Tensor]:
    """A torchvision model's state dict on the meta device: right names and shapes, no memory, no init time."""
    with torch.device("meta"):
        return builder(weights=None).state_dict()


def test_weights_of_another_architecture_fail_in_one_line():
    # checked against the full backbone (as for every method), although layer2 does not use layer3/layer4
    with pytest.raises(BadWeightsFile, match=r"w.pth does not match the backbone of model.arch=resnet18.*fits "
                                             r"model.arch=resnet50"):
        truncated_backbone("resnet18", "layer2", state=_meta_state(resnet50), source="w.pth")
    with pytest.raises(BadWeightsFile, match=r"w.pth does not match the features of model.arch=vgg16: .* missing"):
        truncated_backbone("vgg16", "maxpool3", state=_meta_state(vgg11), source="w.pth")
    with pytest.raises(ValueError, match="model.norm='group' is not available for vgg11"):
        truncated_backbone("vgg11", "maxpool3", norm="group")


@pytest.mark.parametrize("call, message", [
    (lambda: truncated_backbone("resnet18", "layer5"),
     "truncation layer 'layer5' does not exist in resnet18; expected one of conv1, maxpool, layer1, layer2, layer3, "
     "layer4"),
    (lambda: truncated_backbone("tiny_resnet", "layer4"), "'layer4' does not exist in tiny_resnet"),
    (lambda: truncated_backbone("vgg16_bn", "layer3"), "expected one of conv1, maxpool1, maxpool2"),
    (lambda: backbone_receptive_fields("vgg11", "maxpool6", False, 224, 224), "'maxpool6' does not exist in vgg11"),
    (lambda: backbone_receptive_fields("alexnet", "conv1", False, 224, 224), "model.arch='alexnet' has no truncation"),
])
def test_unknown_arch_or_layer(call, message):
    with pytest.raises(UnknownLayer, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


# -------------------------------------------------------------------------------------------------- bad networks


class _Cross(nn.Module):
    """Two branches whose RFs are a 1x3 and a 3x1 rectangle: their union is a cross."""

    def __init__(self) -> None:
        super().__init__()
        self.wide, self.tall = nn.Conv2d(3, 2, (1, 3), padding=(0, 1)), nn.Conv2d(3, 2, (3, 1), padding=(1, 0))

    def forward(self, x):
        return self.wide(x) + self.tall(x)


@pytest.mark.parametrize("module, message", [
    (nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2)), r"node '_0' \(call_module 0\): dilation \(2, 2\) is "
                                                               r"not supported"),
    (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")), "padding_mode='reflect'"),
    (_Cross(), r"cell \(0, 0\) is not a rectangle: rows \(0, 1\) x cols \(0, 2\) and rows \(0, 2\) x cols \(0, 1\)"),
    (nn.Sequential(nn.Conv2d(3, 4, 1, stride=2), nn.Conv2d(4, 4, (1, 2))), r"has a gap \(pixels \[1, 2\).*spec B14"),
    (nn.Sequential(nn.Conv2d(3, 4, 1, padding=2)), "output index 0 reads only padding"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Upsample(scale_factor=2)), "Upsample has no receptive-field rule"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), "Flatten has no receptive-field rule"),
    (nn.Sequential(nn.Conv2d(3, 4, 9)), "kernel 9 is larger than the padded input"),
])
def test_unsupported_networks_are_refused_in_one_line(module, message):
    with pytest.raises(UnsupportedForReceptiveField, match=message) as err:
        receptive_fields(module, 8, 6)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("size", [(0, 5), (5, -1), (5, 100_000), (5.0, 5)])
def test_bad_input_sizes(size):
    with pytest.raises(ValueError, match="receptive fields: input"):
        receptive_fields(nn.Conv2d(3, 3, 1), *size)


# ------------------------------------------------------------------------------------------- pixel-space mappings


def _rf(size, rows, cols) -> ReceptiveFields:
    return ReceptiveFields(size, np.array(rows), np.array(cols))


def test_rf_boxes_and_naive_centres():
    rf = _rf((6, 5), [[0, 4], [2, 6]], [[0, 3], [1, 4], [2, 5]])
    cells = torch.tensor([[0, 5], [4, 2]])  # (0,0), (1,2) / (1,1), (0,2)
    assert rf_boxes(rf, cells).tolist() == [[[0, 0, 3, 4], [2, 2, 5, 6]], [[1, 2, 4, 6], [2, 0, 5, 4]]]
    # round((i + 0.5) * 224 / 7) = 16 + 32 i; on a 4-cell grid of 4 px the halves round to even: 0, 2, 2, 4
    assert naive_centres(torch.tensor([0, 48, 6]), (7, 7), (224, 224)).tolist() == [[16, 16], [208, 208], [208, 16]]
    assert naive_centres(torch.arange(4), (1, 4), (3, 4))[:, 0].tolist() == [0, 2, 2, 4]
    assert naive_centres(torch.tensor([2]), (3, 1), (10, 7)).tolist() == [[4, 8]]  # round(8.33), round(3.5) -> 4
    with pytest.raises(ValueError, match=r"cell indices must lie in \[0, 6\)"):
        rf_boxes(rf, torch.tensor([6]))


def _keys_cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                    np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))


def test_upsample_is_bicubic_of_each_map():
    sims = torch.tensor([[[[0.0, 1.0, 4.0]]], [[[2.0, 2.0, 2.0]]]])  # 2 x 1 x (1 x 3) maps
    out = upsample_maps(sims, (2, 6))
    assert out.shape == (2, 1, 2, 6)
    # Keys' cubic convolution (a = -0.75, border samples repeated), source x = (i + 0.5) / 2 - 0.5
    values = np.array([0.0, 1.0, 4.0])
    expected = []
    for i in range(6):
        src = (i + 0.5) * 3 / 6 - 0.5
        base = math.floor(src)
        taps = np.arange(base - 1, base + 3)
        expected.append(float((_keys_cubic(src - taps) * values[np.clip(taps, 0, 2)]).sum()))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor(expected))
    torch.testing.assert_close(out[0, 0, 1], torch.tensor(expected))
    torch.testing.assert_close(out[1], torch.full((1, 2, 6), 2.0))


def test_heat_maps_on_a_hand_built_rf():
    # Two rows of cells with RF rows [0,4), [2,6) and two columns with cols [0,3), [2,5) of a 6 x 5 image: no
    # clipping, L = 4 (rows, even: peak on the two middle pixels) and 3 (columns), k = 4, sigma = 4.
    rf = _rf((6, 5), [[0, 4], [2, 6]], [[0, 3], [2, 5]])
    e16, e32 = math.exp(-1 / 16), math.exp(-1 / 32)  # exp(-(1.5^2 - 0.5^2) / (2 * 16)), exp(-(1^2 - 0) / (2 * 16))
    rows, cols = rf_kernel(rf, 1.0, torch.float64)
    f64 = torch.float64
    torch.testing.assert_close(rows, torch.tensor([[e16, 1, 1, e16, 0, 0], [0, 0, e16, 1, 1, e16]], dtype=f64))
    torch.testing.assert_close(cols, torch.tensor([[e32, 1, e32, 0, 0], [0, 0, e32, 1, e32]], dtype=f64))
    sims = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    maps = rf_heat_maps(sims, rf)
    # pixel (0, 0): only cell (0, 0); pixel (2, 2): all four cells, each with one row and one column weight
    assert maps.max[0, 0] == maps.sum[0, 0] == maps.avg[0, 0] == pytest.approx(e16 * e32)
    assert maps.max[2, 2] == pytest.approx(4 * e16 * e32)
    assert maps.sum[2, 2] == pytest.approx(1 * e32 + 2 * e32 + 3 * e16 * e32 + 4 * e16 * e32)
    assert maps.avg[2, 2] == pytest.approx(maps.sum[2, 2] / 4)
    # pixel (3, 4): cells (0, 1) (row weight e16) and (1, 1) (row weight 1), column weight e32 for both
    assert maps.max[3, 4] == pytest.approx(4 * e32) and maps.sum[3, 4] == pytest.approx((2 * e16 + 4) * e32)
    assert maps.avg[3, 4] == pytest.approx((2 * e16 + 4) * e32 / 2)
    # negative similarities: the max map starts from 0 as the reference's (pixel (2, 2) is covered by every cell)
    negative = rf_heat_maps(-sims, rf)
    assert negative.max[2, 2] == 0 and negative.sum[2, 2] == pytest.approx(-maps.sum[2, 2])


def test_clipped_border_kernel_stays_centred_on_the_unclipped_rf():
    # RF rows [0,3) and [5,8) are the 5-row RF clipped by the top / bottom border (un-clipped: [-2,3), [5,10)):
    # their Gaussian is the 5-row kernel cropped (peak on the border pixel, the un-clipped RF's centre), not a
    # 3-row kernel (peak in the middle). sigma = k = 5.
    rf = _rf((8, 8), [[0, 3], [1, 6], [5, 8]], [[0, 5]])
    rows, _ = rf_kernel(rf, 1.0, torch.float64)
    g1, g2 = math.exp(-1 / 50), math.exp(-4 / 50)
    expected = [[1, g1, g2, 0, 0, 0, 0, 0], [0, g2, g1, 1, g1, g2, 0, 0], [0, 0, 0, 0, 0, g2, g1, 1]]
    torch.testing.assert_close(rows, torch.tensor(expected, dtype=torch.float64))
    # sigma_factor scales sigma: 0.5 -> sigma 2.5
    rows_half, _ = rf_kernel(rf, 0.5, torch.float64)
    assert rows_half[0, 1].item() == pytest.approx(math.exp(-1 / 12.5))


def test_super_100_percent_rf_centres_cells_on_the_uniform_grid():
    # Every cell sees all 10 rows: grid midpoints round((i + .5) * 10 / 3) = 2, 5, 8; the window grows by twice the
    # largest |4.5 - m| = 3.5 -> round -> 4 (half to even): L = 10 + 8 = 18, start m - 9, centre m (even L: the
    # peak is shared by pixels m - 1 and m). Columns: RF [0,4), [3,7), [6,10) -> no column reaches 10, but the
    # big-cell set spans all columns: pad = round(max |4.5 - (2, 5, 8)|) = 4 -> L = 4 + 8 = 12; k = 18.
    rf = _rf((10, 10), [[0, 10]] * 3, [[0, 4], [3, 7], [6, 10]])
    rows, cols = rf_kernel(rf, 1.0, torch.float64)
    y = torch.arange(10, dtype=torch.float64) + 0.5
    for i, m in enumerate((2, 5, 8)):
        torch.testing.assert_close(rows[i], torch.exp(-((y - m) ** 2 - 0.25) / (2 * 18**2)))
    for i, (m, (x0, x1)) in enumerate(zip((2, 5, 8), ((0, 4), (3, 7), (6, 10)))):
        inside = (torch.arange(10) >= x0) & (torch.arange(10) < x1)
        torch.testing.assert_close(cols[i], torch.exp(-((y - m) ** 2 - 0.25) / (2 * 18**2)) * inside)
    assert rows[0].argmax().item() == 1 and rows[2].argmax().item() == 7  # not the ordinary case's shared centre


def test_super_100_percent_on_resnet50_layer3_peaks_on_the_grid_midpoints():
    # every row of cells of resnet50 layer3 at 224 has an RF reaching 224 in some column: the super-100 % branch;
    # pad = round(111.5 - 8) = 104 -> L = 224 + 208 = 432 (even): each row's peak is shared by pixels m - 1 and m.
    rf = backbone_receptive_fields("resnet50", "layer3", False, 224, 224)
    rows, cols = rf_kernel(rf, 1.0, torch.float64)
    midpoints = [8 + 16 * i for i in range(14)]
    assert [int(r.argmax()) for r in rows] == [m - 1 for m in midpoints]
    assert [round(float(r[m]), 12) for r, m in zip(rows, midpoints)] == [1.0] * 14
    torch.testing.assert_close(rows, cols)


def test_heat_maps_equal_the_cell_by_cell_definition_and_respect_leading_dims(monkeypatch):
    # The separable products / two-stage max against the reference's loop over cells (contribution s * kernel
    # written into the RF rectangle; max from 0, sum, sum / count), on a real non-square RF with clipped borders.
    rf = backbone_receptive_fields("tiny_resnet", "layer2", False, 37, 29)
    torch.manual_seed(0)
    sims = torch.randn(2, 3, *rf.grid, dtype=torch.float64)
    monkeypatch.setattr(pixel_maps, "MAX_MAP_ELEMENTS", 1)  # one map per chunk
    maps = rf_heat_maps(sims, rf, sigma_factor=0.7)
    rows, cols = rf_kernel(rf, 0.7, torch.float64)
    flat = sims.reshape(-1, *rf.grid)
    peak, total = torch.zeros(6, 37, 29, dtype=torch.float64), torch.zeros(6, 37, 29, dtype=torch.float64)
    count = torch.zeros(37, 29, dtype=torch.float64)
    for h in range(rf.grid[0]):
        for w in range(rf.grid[1]):
            y0, y1, x0, x1 = rf.bounds[h, w]
            kernel = torch.outer(rows[h, y0:y1], cols[w, x0:x1])
            part = flat[:, h, w, None, None] * kernel
            peak[:, y0:y1, x0:x1] = torch.maximum(peak[:, y0:y1, x0:x1], part)
            total[:, y0:y1, x0:x1] += part
            count[y0:y1, x0:x1] += 1
    assert maps.max.shape == (2, 3, 37, 29)
    torch.testing.assert_close(maps.max.reshape(6, 37, 29), peak)
    torch.testing.assert_close(maps.sum.reshape(6, 37, 29), total)
    torch.testing.assert_close(maps.avg.reshape(6, 37, 29), total / count)


def test_heat_map_inputs_are_checked():
    rf = _rf((6, 5), [[0, 4], [2, 6]], [[0, 3], [2, 5]])
    with pytest.raises(ValueError, match=r"must end in the feature map's 2x2, got shape \(3, 2, 3\)"):
        rf_heat_maps(torch.zeros(3, 2, 3), rf)
    with pytest.raises(ValueError, match="sigma_factor must be > 0"):
        rf_heat_maps(torch.zeros(2, 2), rf, sigma_factor=0.0)
