"""A CNN backbone cut after a named layer (PixPNet spec §1.1): images B x 3 x H x W -> that layer's feature map.

PixPNet compares prototypes with the cells of an *intermediate* feature map, chosen so that a cell sees an object
part rather than the whole image (spec §0.2, §4.7). The layer names are the reference's:

* torchvision ResNets and our `ResNetBackbone` (incl. QPM's reduced strides): `conv1` (after the stem's ReLU),
  `maxpool`, `layer1` .. `layer4`;
* our `TinyResNet` (tests, demo): `conv1` (after the ReLU), `layer1` .. `layer3`;
* torchvision VGG / VGG-BN: `conv1` (the first ReLU), `maxpool1` .. `maxpool5` (the K-th max-pool).

The cut is inclusive. The truncated module keeps torchvision's parameter names (`conv1.weight`, `layer1.0.bn1.*`,
VGG's `features.7.weight`), so a checkpoint of the truncated model and the user's torchvision weights file both load
by name. The weights file is checked and loaded against the *full* backbone, exactly as `models.backbones` does for
the other methods (one error line naming what is missing / unexpected / misshaped), and only then cut.

API:
* `backbone_layers(arch)` -> the valid layer names, shallow to deep (the last is the default, spec §1.1);
* `truncated_backbone(arch, layer, ...)` -> `TruncatedBackbone` (an nn.Sequential with `.arch`, `.layer`,
  `.num_features` = the output channels);
* `truncated_backbone_from_config(cfg, layer)` -> the same, with `cfg.weights` loaded (a `ModelConfig`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models import vgg

from qpm_dist.config import ModelConfig
from qpm_dist.models.backbones import _mismatch, _shapes, build_backbone, load_backbone_weights, read_state_dict
from qpm_dist.models.weight_files import BadWeightsFile

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50")
# torchvision's VGG configurations ("A" = VGG-11 ... "E" = VGG-19); the `_bn` variants add BatchNorm after each conv.
VGG_ARCHS = {f"vgg{depth}{bn}": (cfg, bool(bn)) for depth, cfg in ((11, "A"), (13, "B"), (16, "D"), (19, "E"))
             for bn in ("", "_bn")}
_RESNET_LAYERS = ("conv1", "maxpool", "layer1", "layer2", "layer3", "layer4")
_TINY_LAYERS = ("conv1", "layer1", "layer2", "layer3")
_VGG_LAYERS = ("conv1", "maxpool1", "maxpool2", "maxpool3", "maxpool4", "maxpool5")
# The submodules of our ResNet-style backbones that each layer name ends with (the stem's conv1 includes bn1, relu).
_STEM = ("conv1", "bn1", "relu")


class UnknownLayer(ValueError):
    """A truncation layer (or architecture) that the backbone does not have; the message lists the valid ones."""


def supported_archs() -> tuple[str, ...]:
    return ("tiny_resnet", *RESNET_ARCHS, *VGG_ARCHS)


def backbone_layers(arch: str) -> tuple[str, ...]:
    """The layer names `arch` can be cut at, shallow to deep; the last one is the reference's default."""
    if arch == "tiny_resnet":
        return _TINY_LAYERS
    if arch in RESNET_ARCHS:
        return _RESNET_LAYERS
    if arch in VGG_ARCHS:
        return _VGG_LAYERS
    raise UnknownLayer(f"model.arch={arch!r} has no truncation layers; expected one of {', '.join(supported_archs())}")


def check_layer(arch: str, layer: str) -> None:
    """ValueError (UnknownLayer) in one line naming `layer` and the valid ones, before anything is built."""
    valid = backbone_layers(arch)
    if layer not in valid:
        raise UnknownLayer(f"truncation layer {layer!r} does not exist in {arch}; expected one of {', '.join(valid)}")


class TruncatedBackbone(nn.Sequential):
    """The backbone's modules up to and including `layer`, run in order (submodule names as in torchvision)."""

    def __init__(self, modules: OrderedDict[str, nn.Module], arch: str, layer: str) -> None:
        super().__init__(modules)
        self.arch, self.layer = arch, layer
        self.num_features = _output_channels(self)


def _output_channels(module: nn.Module) -> int:
    """Channels of the output: those of the last convolution (the reference walks backwards to it too; in a ResNet
    block the last registered conv is conv2/conv3 or the downsample conv, both with the block's output width)."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _cut_resnet(backbone: nn.Module, layer: str) -> OrderedDict[str, nn.Module]:
    """The stem (conv1, bn1, relu), then maxpool / layer1.. in the backbone's forward order, up to `layer`."""
    order = [*_STEM] + [name for name in ("maxpool", "layer1", "layer2", "layer3", "layer4") if hasattr(backbone, name)]
    end = len(_STEM) if layer == "conv1" else order.index(layer) + 1
    return OrderedDict((name, getattr(backbone, name)) for name in order[:end])


def _cut_vgg(features: nn.Sequential, layer: str) -> OrderedDict[str, nn.Module]:
    """`features` up to its first ReLU (`conv1`) or K-th MaxPool2d (`maxpoolK`), kept under the name `features` so
    that torchvision's keys (`features.<index>.weight`) stay valid."""
    kind, k = (nn.ReLU, 1) if layer == "conv1" else (nn.MaxPool2d, int(layer[len("maxpool"):]))
    hits = [i for i, m in enumerate(features) if isinstance(m, kind)]
    return OrderedDict(features=features[: hits[k - 1] + 1])


def _vgg_features(arch: str, norm: str) -> nn.Sequential:
    """torchvision's VGG `features` (its `make_layers`, initialised as its VGG class does), without avgpool and the
    classifier (120 M parameters that a truncated model never uses), as a module whose keys are `features.*`."""
    if norm not in ("batch", "sync_batch"):
        raise ValueError(f"model.norm={norm!r} is not available for {arch} (torchvision's VGG-BN uses BatchNorm); "
                         f"expected 'batch' or 'sync_batch'")
    cfg, batch_norm = VGG_ARCHS[arch]
    features = vgg.make_layers(vgg.cfgs[cfg], batch_norm=batch_norm)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return nn.Sequential(OrderedDict(features=features))


def _load_vgg_weights(full: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """Every `features.*` tensor of the VGG must be in `state` with its shape, and nothing else but the classifier,
    or BadWeightsFile in one line (as `backbones.check_backbone_weights` does for the ResNets)."""
    body = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    parts = _mismatch(_shapes(full), body)
    if parts:
        raise BadWeightsFile(f"model.weights: {source} does not match the features of model.arch={arch}: "
                             + "; ".join(parts))
    full.load_state_dict(body, strict=True)


def truncated_backbone(arch: str, layer: str, reduced_strides: bool = False, norm: str = "batch",
                       tiny_width: int = 16, state: dict[str, torch.Tensor] | None = None,
                       source: str = "model.weights") -> TruncatedBackbone:
    """`arch` cut after `layer` (inclusive). `state` (a torchvision-layout state dict, e.g. from `read_state_dict`)
    is checked against and loaded into the full backbone first, so a file for another architecture fails with the
    same one-line message as everywhere else; `source` names it in that message. Unknown arch/layer -> UnknownLayer.
    Build under `torch.device("meta")` for a shape-only model (the receptive-field computation does)."""
    check_layer(arch, layer)
    if arch in VGG_ARCHS:
        full = _vgg_features(arch, norm)
        if state is not None:
            _load_vgg_weights(full, state, source, arch)
        return TruncatedBackbone(_cut_vgg(full.features, layer), arch, layer)
    full = build_backbone(arch, reduced_strides, norm, tiny_width)
    if state is not None:
        load_backbone_weights(full, state, source, arch)
    return TruncatedBackbone(_cut_resnet(full, layer), arch, layer)


def truncated_backbone_from_config(cfg: ModelConfig, layer: str) -> TruncatedBackbone:
    """`truncated_backbone` for `cfg.arch`/`cfg.reduced_strides`/`cfg.norm`/`cfg.tiny_width`, with `cfg.weights`
    (a local file, read as for the other methods: `backbones.read_state_dict`) loaded when given."""
    check_layer(cfg.arch, layer)
    state = read_state_dict(cfg.weights, cfg.weights_key) if cfg.weights else None
    return truncated_backbone(cfg.arch, layer, cfg.reduced_strides, cfg.norm, cfg.tiny_width, state, cfg.weights or "")
