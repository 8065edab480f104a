"""PixPNet's prototype head (specs/pixpnet.md §1.2, §1.3): add-on layers, class-specific prototypes, the
distance of every latent cell to every prototype, its similarity, and the class read-out.

The head sits on whatever feature map B x C x Hz x Wz a backbone produces (a truncated ResNet/VGG, the tiny
ResNet): `Classifier(backbone, PrototypeHead(...))`. It follows the heads' convention of models.net:

* `ModelOutput.logits` (B x C): `proto` read-out: logit_c = sum of class c's prototypes' similarities (PixPNet,
  parameter-free); `linear` read-out: a bias-free Linear(P -> C) initialised +1 own class / -0.5 other (ProtoPNet).
* `ModelOutput.feature_maps` (B x P x Hz x Wz): the similarity maps sim(d) of every prototype at every cell,
  positive like the other heads' post-ReLU maps, and on the path to the logits, so the autograd Grad-CAM of the
  pointing metrics (gradcam.class_maps, no linear form for this kind) and every metric that reads feature maps
  work unchanged: a prototype plays the part a feature channel plays in the dense and sparse heads.
* `ModelOutput.features` (B x P): each prototype's max similarity = sim(min_cells d), taken from the similarity
  maps at the argmin cell of the distances (so the gradient reaches the maps through one cell, as max pooling).
* `class_weights()` (C x P): the one-hot prototype -> class identity (`proto`) or the linear layer's weight, so
  logits = features @ class_weights().T for both read-outs.
* `ModelOutput.prototypes`: a `PrototypeMatch` with the distance maps (B x P x Hz x Wz), the min distances and
  argmin cells (B x P, flat index h * Wz + w) and the add-on output (the latent maps): what the cluster and
  separation losses (losses.prototypes), the push (methods.pixpnet_push) and the pixel-space mappings read.
  A field of the output, not a second method call, so the losses get the values of the very forward pass that
  the training strategy (DDP, DeepSpeed) ran.

Distances, similarities and the min are computed in fp32 with autocast disabled, whatever the run's precision
(spec §7.2: 1/(d + 1e-6) reaches 1e6, beyond fp16's 65504; bf16 is coarse near d = 0); the add-on convolutions
run under the caller's autocast. Only prototypes of 1 x 1 cells (K = 1, the configs' value) exist here: the
reference's K > 1 normalises each position of a patch separately (B12) and its RF mappings assume K = 1.

The head also keeps, as buffers saved with the model, where each prototype was last pushed to (`source_sample`,
the global training index, and `source_cell`, the flat cell; -1 before any push): what the report shows.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qpm_dist.models.net import ModelOutput, register_head

ADD_ONS = ("regular", "bottleneck")
DISTANCES = ("cosine", "l2")
ACTIVATIONS = ("log", "linear")
READOUTS = ("proto", "linear")
LOG_EPS = 1e-6  # the reference's epsilon of the log activation


class PrototypeMatch(NamedTuple):
    """What a prototype head computed besides logits (all fp32)."""

    distances: torch.Tensor  # B x P x Hz x Wz, distance of every latent cell to every prototype
    min_distances: torch.Tensor  # B x P, the min over cells
    min_cells: torch.Tensor  # B x P int64, the argmin cell as the flat index h * Wz + w (first one on ties)
    latent: torch.Tensor  # B x D x Hz x Wz, the add-on layers' output (the run's autocast dtype)


def add_on_layers(kind: str, in_channels: int, dim: int, init_weights: bool = True) -> nn.Sequential:
    """The 1x1 convolutions between the backbone and the prototypes (spec §1.2), ending in a Sigmoid.

    `regular`: conv C->D, ReLU, conv D->D (`conv_last`), Sigmoid. `bottleneck`: pairs (conv, ReLU, conv, ReLU)
    halving the channels down to D, the last pair ending in `conv_last` and Sigmoid. Init (the reference's
    `init_weights`): every conv Kaiming-normal (fan_out, relu) except `conv_last`, Xavier-normal gain 1; biases 0."""
    if kind not in ADD_ONS:
        raise ValueError(f"prototype add-on layers must be one of {ADD_ONS}, got {kind!r}")
    if in_channels < 1 or dim < 1:
        raise ValueError(f"prototype add-on layers: channels must be positive, got {in_channels} -> {dim}")
    layers: list[tuple[str, nn.Module]] = []
    if kind == "regular":
        layers = [("conv1", nn.Conv2d(in_channels, dim, 1)), ("relu1", nn.ReLU()),
                  ("conv_last", nn.Conv2d(dim, dim, 1)), ("sigmoid", nn.Sigmoid())]
    else:
        current, index = in_channels, 1
        while current > dim or not layers:
            out = max(dim, current // 2)
            last = out == dim
            layers += [(f"conv{index}", nn.Conv2d(current, out, 1)), (f"relu{index}", nn.ReLU()),
                       ("conv_last" if last else f"conv{index + 1}", nn.Conv2d(out, out, 1)),
                       ("sigmoid" if last else f"relu{index + 1}", nn.Sigmoid() if last else nn.ReLU())]
            current, index = current // 2, index + 2
            if last:
                break
    sequential = nn.Sequential(OrderedDict(layers))
    if init_weights:
        for name, module in sequential.named_children():
            if isinstance(module, nn.Conv2d):
                if name == "conv_last":
                    nn.init.xavier_normal_(module.weight, gain=1.0)
                else:
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
    return sequential


def cosine_distances(latent: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """d = 1 - clamp(cos(z, p), -1, 1) in [0, 2] for every cell z of `latent` (B x D x H x W) and prototype.

    `prototypes` is P x D (the same prototypes for every image: B x P x H x W) or B x M x D (per-image
    prototypes, the push's own-class ones: B x M x H x W). fp32, both sides L2-normalised over D first."""
    z = F.normalize(latent.float(), p=2, dim=1)
    p = F.normalize(prototypes.float(), p=2, dim=-1)
    cos = torch.einsum("bdhw,pd->bphw", z, p) if p.ndim == 2 else torch.einsum("bdhw,bmd->bmhw", z, p)
    return 1 - cos.clamp(-1, 1)


def l2_distances(latent: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """||z - p||^2 = sum z^2 - 2 z.p + sum p^2, clipped at 0 (rounding), in fp32; shapes as cosine_distances."""
    z, p = latent.float(), prototypes.float()
    zz = (z * z).sum(dim=1, keepdim=True)  # B x 1 x H x W
    pp = (p * p).sum(dim=-1)
    if p.ndim == 2:
        zp, pp = torch.einsum("bdhw,pd->bphw", z, p), pp[None, :, None, None]
    else:
        zp, pp = torch.einsum("bdhw,bmd->bmhw", z, p), pp[:, :, None, None]
    return (zz - 2 * zp + pp).clamp_min(0)


def log_similarity(distances: torch.Tensor, eps: float = LOG_EPS) -> torch.Tensor:
    """sim = log((d + 1) / (d + eps)) = log(1 + 1 / (d + eps)), in fp32: 13.8155 at d = 0, log 2 at 1, log 1.5 at 2."""
    with torch.autocast(distances.device.type, enabled=False):
        return torch.log1p(1 / (distances.float() + eps))


def nearest_cells(distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min distance, argmin cell) over the H x W grid of `distances` (... x H x W); the cell is the flat index
    h * W + w, the first (smallest) one when several cells tie."""
    return distances.flatten(-2).min(dim=-1)


DISTANCE_FUNCTIONS = {"cosine": cosine_distances, "l2": l2_distances}


@register_head("prototype")
class PrototypeHead(nn.Module):
    """Add-on layers, P = num_classes x prototypes_per_class class-specific prototypes (prototype j belongs to
    class j // prototypes_per_class), distances, similarities, read-out. See the module docstring."""

    def __init__(self, num_features: int, num_classes: int, prototypes_per_class: int = 10, dim: int = 192,
                 add_on: str = "regular", distance: str = "cosine", activation: str = "log",
                 readout: str = "proto", init_weights: bool = True) -> None:
        super().__init__()
        for name, value, allowed in (("distance", distance, DISTANCES), ("activation", activation, ACTIVATIONS),
                                     ("readout", readout, READOUTS)):
            if value not in allowed:
                raise ValueError(f"prototype head: {name} must be one of {allowed}, got {value!r}")
        if num_classes < 1 or prototypes_per_class < 1 or dim < 1:
            raise ValueError(f"prototype head: num_classes ({num_classes}), prototypes_per_class "
                             f"({prototypes_per_class}) and dim ({dim}) must be positive")
        self.num_features, self.num_classes, self.dim = num_features, num_classes, dim
        self.per_class = prototypes_per_class
        self.add_on_kind, self.distance, self.activation, self.readout_kind = add_on, distance, activation, readout
        self.init_weights = init_weights
        self.add_on = add_on_layers(add_on, num_features, dim, init_weights)
        num_prototypes = num_classes * prototypes_per_class
        self.prototypes = nn.Parameter(torch.rand(num_prototypes, dim))  # U[0, 1) as the reference
        identity = torch.zeros(num_prototypes, num_classes)
        identity[torch.arange(num_prototypes), torch.arange(num_prototypes) // prototypes_per_class] = 1
        self.register_buffer("class_identity", identity)  # P x C one-hot
        self.register_buffer("source_sample", torch.full((num_prototypes,), -1, dtype=torch.long))
        self.register_buffer("source_cell", torch.full((num_prototypes,), -1, dtype=torch.long))
        self.linear = None
        if readout == "linear":
            self.linear = nn.Linear(num_prototypes, num_classes, bias=False)
            with torch.no_grad():  # ProtoPNet's correct_strength +1, incorrect_strength -0.5
                self.linear.weight.copy_(1.5 * identity.T - 0.5)

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.shape[0]

    def options(self) -> dict[str, Any]:
        return {"num_features": self.num_features, "num_classes": self.num_classes,
                "prototypes_per_class": self.per_class, "dim": self.dim, "add_on": self.add_on_kind,
                "distance": self.distance, "activation": self.activation, "readout": self.readout_kind,
                "init_weights": self.init_weights}

    @classmethod
    def from_state(cls, options: dict[str, Any], state: dict[str, torch.Tensor]) -> "PrototypeHead":
        return cls(**options)

    def class_weights(self) -> torch.Tensor:
        """C x P: logits = features @ class_weights().T (the one-hot identity for the `proto` read-out)."""
        return self.class_identity.T if self.linear is None else self.linear.weight

    def parameter_sets(self) -> dict[str, list[nn.Parameter]]:
        """The head's parameters by the optimiser groups of spec §2.3 (add-on: lr 3e-3, wd 1e-3; prototypes:
        lr 3e-3, wd 0; readout: lr 1e-4, wd 0, empty for the `proto` read-out); the backbone's are the fourth."""
        return {"add_on": list(self.add_on.parameters()), "prototypes": [self.prototypes],
                "readout": [] if self.linear is None else [self.linear.weight]}

    def prototype_classes(self) -> torch.Tensor:
        """P int64: the class of every prototype."""
        return torch.arange(self.num_prototypes, device=self.prototypes.device) // self.per_class

    def latent(self, feature_maps: torch.Tensor) -> torch.Tensor:
        """The add-on layers' output (B x D x Hz x Wz), under the caller's autocast."""
        return self.add_on(feature_maps)

    def distances(self, latent: torch.Tensor, prototypes: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 distances of every latent cell to `prototypes` (default: all of this head's, P x D; or B x M x D)."""
        with torch.autocast(latent.device.type, enabled=False):
            return DISTANCE_FUNCTIONS[self.distance](latent, self.prototypes if prototypes is None else prototypes)

    def own_class_distances(self, latent: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """B x M x Hz x Wz: the distances of each image's cells to its own class's M prototypes only (the push)."""
        own = self.prototypes.view(self.num_classes, self.per_class, self.dim)[labels]
        return self.distances(latent, own)

    def similarity(self, distances: torch.Tensor) -> torch.Tensor:
        """The activation (fp32): `log` = log((d+1)/(d+eps)); `linear` = 1 - d (cosine) or -d (l2)."""
        if self.activation == "log":
            return log_similarity(distances)
        with torch.autocast(distances.device.type, enabled=False):
            return (1 - distances.float()) if self.distance == "cosine" else -distances.float()

    def forward(self, feature_maps: torch.Tensor) -> ModelOutput:
        latent = self.latent(feature_maps)
        with torch.autocast(latent.device.type, enabled=False):
            distances = self.distances(latent)
            sims = self.similarity(distances)
            _, cells = nearest_cells(distances)
            index = cells.unsqueeze(-1)
            min_distances = distances.flatten(2).gather(2, index).squeeze(2)
            features = sims.flatten(2).gather(2, index).squeeze(2)  # B x P: sim(min d), the max similarity
            if self.linear is None:  # logit_c = sum of class c's similarities (spec §1.3 `proto`)
                logits = features.view(-1, self.num_classes, self.per_class).sum(dim=2)
            else:
                logits = F.linear(features, self.linear.weight.float())
        return ModelOutput(logits, sims, features, PrototypeMatch(distances, min_distances, cells, latent))
