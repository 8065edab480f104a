"""Convolutional backbones that return the last feature maps (post-ReLU, before pooling).

* torchvision ResNet-18/34/50, optionally with QPM's reduced strides (layer3 and layer4 with stride 1,
  output stride 8: 28x28 maps at 224 px instead of 7x7). Weights come only from a local file the user
  names; the parameter names are torchvision's, so torchvision checkpoints load unchanged.
* A tiny ResNet of the same structure for CPU tests and the demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.resnet import BasicBlock, Bottleneck

from qpm_dist.config import ConfigError, ModelConfig
from qpm_dist.models.weight_files import BadWeightsFile, load_checkpoint, select_state_dict
from qpm_dist.utils import log

NormFactory = Callable[[int], nn.Module]


def norm_factory(kind: str) -> NormFactory:
    """BatchNorm ('batch'; 'sync_batch' is converted after construction) or GroupNorm ('group').

    GroupNorm's statistics are per sample, so a model built with it trains identically on any number of
    ranks — the property our 1-process vs 2-process equality test relies on.
    """
    if kind in ("batch", "sync_batch"):
        return nn.BatchNorm2d
    if kind == "group":
        return lambda channels: nn.GroupNorm(num_groups=min(8, channels // 4) or 1, num_channels=channels)
    raise ValueError(f"unknown norm {kind!r}; expected 'batch', 'sync_batch' or 'group'")


def _set_stride_one(layer: nn.Sequential) -> None:
    """Make the first block of a ResNet stage keep the resolution (weights unchanged, shapes unchanged)."""
    block = layer[0]
    conv = block.conv2 if isinstance(block, Bottleneck) else block.conv1
    conv.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)


class ResNetBackbone(nn.Module):
    """The convolutional trunk of a torchvision ResNet: stem + layer1..layer4, no pooling, no fc.

    The submodule names (conv1, bn1, layer1, ...) equal torchvision's, so its state dicts load directly.
    """

    def __init__(self, arch: str, reduced_strides: bool, norm: str = "batch") -> None:
        super().__init__()
        builders = {"resnet18": resnet.resnet18, "resnet34": resnet.resnet34, "resnet50": resnet.resnet50}
        if arch not in builders:
            raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(builders)}")
        net = builders[arch](weights=None, norm_layer=norm_factory(norm))
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if reduced_strides:
            _set_stride_one(self.layer3)
            _set_stride_one(self.layer4)
        self.num_features = net.fc.in_features
        self.output_stride = 8 if reduced_strides else 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class TinyResNet(nn.Module):
    """A three-stage ResNet with BasicBlocks (widths w, 2w, 4w) for CPU tests and the demo.

    Stem: 3x3 conv stride 2. Stages: stride 1, 2, 2 (the last one 1 with reduced strides), so a 64 px
    image gives 8x8 maps (16x16 with reduced strides) with 4w channels.
    """

    def __init__(self, width: int = 16, reduced_strides: bool = True, norm: str = "batch") -> None:
        super().__init__()
        make_norm = norm_factory(norm)
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = make_norm(width)
        self.relu = nn.ReLU(inplace=True)
        strides = (1, 2, 1 if reduced_strides else 2)
        layers, in_ch = [], width
        for i, stride in enumerate(strides):
            out_ch = width * 2**i
            downsample = None
            if stride != 1 or in_ch != out_ch:
                downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), make_norm(out_ch))
            layers.append(BasicBlock(in_ch, out_ch, stride=stride, downsample=downsample, norm_layer=make_norm))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3 = layers
        self.num_features = in_ch
        self.output_stride = 4 if reduced_strides else 8
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


def num_features(arch: str, tiny_width: int = 16) -> int:
    """Channels of the backbone's last feature maps (the F that the sparse-head methods select from), without
    building it: 512 x the block expansion for the torchvision ResNets, 4 x width for the tiny one."""
    if arch == "tiny_resnet":
        return 4 * tiny_width
    block = {"resnet18": BasicBlock, "resnet34": BasicBlock, "resnet50": Bottleneck}[arch]
    return 512 * block.expansion


def output_stride(arch: str, reduced_strides: bool) -> int:
    """The backbone's total stride (input pixels per feature-map cell), without building it."""
    if arch == "tiny_resnet":
        return 4 if reduced_strides else 8
    return 8 if reduced_strides else 32


def check_feature_count(n: int, key: str, model_cfg: ModelConfig) -> None:
    """A method's feature count cannot exceed the backbone's (a config check, before any work)."""
    available = num_features(model_cfg.arch, model_cfg.tiny_width)
    if n > available:
        raise ConfigError(f"{key} ({n}) exceeds the {available} features of model.arch={model_cfg.arch}")


def build_backbone(arch: str, reduced_strides: bool, norm: str = "batch", tiny_width: int = 16) -> nn.Module:
    if arch == "tiny_resnet":
        return TinyResNet(width=tiny_width, reduced_strides=reduced_strides, norm=norm)
    return ResNetBackbone(arch, reduced_strides=reduced_strides, norm=norm)


def read_state_dict(path: str | Path, key: str = "auto") -> dict[str, torch.Tensor]:
    """The state dict of a local weights file (see `weight_files`: the formats read, how they are read safely,
    and which state dict `key` selects; "module." prefixes stripped)."""
    state, where = select_state_dict(load_checkpoint(path), key, path)
    log.info("model.weights: %s: %d tensors from %s", path, len(state), where)
    return state


def _body(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone's part of a torchvision state dict: without the classifier (`fc.*`)."""
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _mismatch(own: dict[str, tuple], body: dict[str, torch.Tensor]) -> list[str]:
    """What differs between the backbone's tensor shapes `own` and the file's `body`, as phrases (none: a match)."""
    missing = sorted(set(own) - set(body))
    unexpected = sorted(set(body) - set(own))
    bad_shape = sorted(k for k in set(own) & set(body) if tuple(own[k]) != tuple(body[k].shape))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if bad_shape:
        k = bad_shape[0]
        parts.append(f"{len(bad_shape)} with a different shape (e.g. {k}: file {tuple(body[k].shape)} "
                     f"vs model {tuple(own[k])})")
    return parts


def _shapes(backbone: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in backbone.state_dict().items()}


def _matching_arch(body: dict[str, torch.Tensor]) -> str | None:
    """The torchvision ResNet whose backbone `body` fits (built on the meta device: no memory, no init)."""
    for arch in ("resnet18", "resnet34", "resnet50"):
        with torch.device("meta"):
            if not _mismatch(_shapes(ResNetBackbone(arch, reduced_strides=False)), body):
                return arch
    return None


def check_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """Every backbone tensor must be in `state` with its shape, and nothing else (the classifier's `fc.*` aside),
    or BadWeightsFile in one line: what is missing, unexpected or shaped differently, and which model.arch the
    file would fit (a ResNet-18 file given to model.arch=resnet50)."""
    body = _body(state)
    parts = _mismatch(_shapes(backbone), body)
    if parts:
        fits = _matching_arch(body)
        hint = f"; the file fits model.arch={fits}" if fits and fits != arch else ""
        raise BadWeightsFile(f"model.weights: {source} does not match the backbone of model.arch={arch}: "
                             + "; ".join(parts) + hint)


def check_weights_file(cfg: ModelConfig) -> None:
    """Before any work: `cfg.weights` is readable and fits the backbone of `cfg.arch`. The backbone is built on
    the meta device and zip files are memory-mapped, so this reads the file's pickle but no tensor data."""
    state = read_state_dict(cfg.weights, cfg.weights_key)
    with torch.device("meta"):
        backbone = build_backbone(cfg.arch, cfg.reduced_strides, cfg.norm, cfg.tiny_width)
    check_backbone_weights(backbone, state, cfg.weights, cfg.arch)


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """Load the backbone part of `state` strictly (`check_backbone_weights`); torchvision's `fc.*` is ignored."""
    check_backbone_weights(backbone, state, source, arch)
    backbone.load_state_dict(_body(state), strict=True)
