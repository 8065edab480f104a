"""The classifier: a backbone producing feature maps and a head that maps them to class logits.

Every head exposes `class_weights()` (the C x F' matrix the feature diversity loss and the
interpretability metrics read) and returns its pooled feature vector, so losses, statistics and metrics
work the same for the dense model and for the sparse models.

Head types are registered by name (`register_head`). A saved model names its head's type and the head's
constructor options next to the state dict (`models.io`), so loading rebuilds the head it was saved with,
never one guessed from the state dict's keys. A head type implements `options()` (what its constructor needs
besides its tensors) and `from_state(options, state)` (the head rebuilt from them and its own state dict).
"""

from __future__ import annotations

from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from qpm_dist.config import ModelConfig
from qpm_dist.errors import BadInput
from qpm_dist.utils import log
from qpm_dist.models.backbones import build_backbone, load_backbone_weights, read_state_dict


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # B x C
    feature_maps: torch.Tensor  # B x F' x H x W, post-ReLU, in the head's feature space
    features: torch.Tensor  # B x F', the vector the final linear layer reads
    # what a head computes besides these, for its own losses and tools (a prototype head's distances and argmin
    # cells: models.protonet.PrototypeMatch); None for the dense and sparse heads
    prototypes: Any = None


HEAD_TYPES: dict[str, type[nn.Module]] = {}
HeadType = TypeVar("HeadType", bound=type)


def register_head(kind: str):
    """Class decorator: make a head type loadable by its name `kind` (stored in every saved model)."""

    def register(cls: HeadType) -> HeadType:
        if HEAD_TYPES.get(kind, cls) is not cls:
            raise ValueError(f"head type {kind!r} is already registered by {HEAD_TYPES[kind].__qualname__}")
        cls.kind = kind
        HEAD_TYPES[kind] = cls
        return cls

    return register


POOLINGS = ("avg", "max")


@register_head("dense")
class DenseHead(nn.Module):
    """Global pooling -> dropout -> linear layer with bias (the reference's dense configuration).

    `pooling` "avg" is the usual global average; "max" is the GC paper's GMP variant (specs/gc_consistency.md
    §1), global max pooling in training and evaluation. A model file saved before the option existed has no
    `pooling` among its head options and loads as "avg", which is what it was trained with."""

    def __init__(self, num_features: int, num_classes: int, dropout: float = 0.2, pooling: str = "avg") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(num_features, num_classes)

    def options(self) -> dict[str, Any]:
        return {"num_features": self.linear.in_features, "num_classes": self.linear.out_features,
                "dropout": self.dropout.p, "pooling": self.pooling}

    @classmethod
    def from_state(cls, options: dict[str, Any], state: dict[str, torch.Tensor]) -> "DenseHead":
        return cls(**options)

    def class_weights(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, feature_maps: torch.Tensor) -> ModelOutput:
        if self.pooling == "max":  # torchvision's AdaptiveMaxPool2d: the gradient goes to one arg-max cell (gradcam)
            pooled = F.adaptive_max_pool2d(feature_maps, 1).flatten(1)
        else:
            pooled = feature_maps.mean(dim=(2, 3))
        features = self.dropout(pooled)
        return ModelOutput(self.linear(features), feature_maps, features)


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def forward(self, images: torch.Tensor) -> ModelOutput:
        return self.head(self.backbone(images))


class WeightsHeadMismatch(BadInput, ValueError):
    """model.weights has no classifier for the dataset's classes, but the run needs one (dense.epochs=0)."""


def build_model(cfg: ModelConfig, num_classes: int, require_head: bool = False) -> Classifier:
    """Build backbone + dense head; load `cfg.weights` (a local file) if given.

    A torchvision checkpoint's `fc.*` initialises the head only when the class count matches (1000 for
    ImageNet weights), as the reference does; otherwise the head keeps its random initialisation, which is
    right before training and wrong without it: `require_head` (dense.epochs=0, the dense model is the file as
    given) then raises WeightsHeadMismatch, e.g. for a subset of ImageNet's classes, whose accuracy would be chance.
    """
    backbone = build_backbone(cfg.arch, cfg.reduced_strides, cfg.norm, cfg.tiny_width)
    head = DenseHead(backbone.num_features, num_classes, cfg.dropout, cfg.pooling)
    if cfg.weights:
        state = read_state_dict(cfg.weights, cfg.weights_key)
        load_backbone_weights(backbone, state, cfg.weights, cfg.arch)
        fc_w, fc_b = state.get("fc.weight"), state.get("fc.bias")
        if fc_w is not None and fc_b is not None and tuple(fc_w.shape) == tuple(head.linear.weight.shape):
            head.linear.load_state_dict({"weight": fc_w, "bias": fc_b})
        elif require_head:
            found = "no fc.weight/fc.bias" if fc_w is None or fc_b is None else f"fc.weight {tuple(fc_w.shape)}"
            raise WeightsHeadMismatch(
                f"model.weights: {cfg.weights} has {found}, but dense.epochs=0 uses the file as the dense model, which "
                f"needs a classifier for the dataset's {num_classes} classes {tuple(head.linear.weight.shape)}; train "
                f"the dense model (dense.epochs > 0) or give weights with that head")
        elif fc_w is not None:
            log.info("model.weights: its fc.weight %s does not fit the dataset's %d classes: the head starts random "
                     "and is trained", tuple(fc_w.shape), num_classes)
    return Classifier(backbone, head)
