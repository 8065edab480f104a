"""Differentiable element-wise Grad-CAM maps (specs/gc_consistency.md §2, §10.4, §10.5).

The map of class c at a layer with activations A (B x K x h x w) is M = ReLU(sum_k G_k * A_k) with
G = d(sum_b logit_b[c_b]) / dA, the gradient kept per cell ("HiResCAM"; no spatial averaging of G). It is
used twice: inside training (the consistency loss needs it differentiable w.r.t. every parameter) and by the
pointing metrics. Two ways to compute it:

* the closed form, for a head that is a linear layer on pooled feature maps: with average pooling
  G_k(i, j) = V[c, k] / (h w), so M = ReLU(V[c] . A) / (h w) (the CAM); with max pooling the gradient of
  channel k goes to its arg-max cell only, so M is V[c, k] * max A_k scattered there. No double backward, so
  it works under torch.compile and activation checkpointing. V are the effective class weights of the head
  (`linear_form`); a head's dropout is not part of it, so the closed form is the eval-mode map.
* the autograd path for anything else (another layer, another head): G from `torch.autograd.grad` with
  `create_graph=True`, so the map stays differentiable (double backward).

Both compute in fp32 whatever the autocast (1e-8 underflows in fp16 and cells are O(1/hw)).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-8


class LinearForm(NamedTuple):
    """logits = pool(maps) @ weights.T + (a constant): what the closed form needs from a head."""

    weights: torch.Tensor  # C x K, the effective class weights on the pooled maps
    pooling: str  # "avg" or "max" (max: the gradient goes to one arg-max cell per channel)


def _dense_form(head: nn.Module) -> LinearForm:
    return LinearForm(head.linear.weight, head.pooling)


def _sparse_form(head: nn.Module) -> LinearForm:
    # z = (mean(maps) - mean) / std, logits = z @ W.T + b: the weight on the pooled map k is W[:, k] / std_k
    return LinearForm(head.weight / head.std.clamp_min(1e-6), "avg")


# Head kind (models.net.register_head) -> its linear form. A head type not listed takes the autograd path.
LINEAR_FORMS: dict[str, Callable[[nn.Module], LinearForm]] = {"dense": _dense_form, "sparse": _sparse_form}


def linear_form(head: nn.Module) -> LinearForm | None:
    """The head's linear form if its kind has one (see LINEAR_FORMS), else None."""
    form = LINEAR_FORMS.get(getattr(head, "kind", None))
    return form(head) if form is not None else None


def normalise(maps: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The reference's map -> distribution: M / (sum M + eps) + eps (the second eps on every cell, §2.4)."""
    return maps / (maps.sum(dim=(-2, -1), keepdim=True) + eps) + eps


def closed_form(feature_maps: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor,
                pooling: str = "avg") -> torch.Tensor:
    """B x h x w element-wise Grad-CAM of class labels[b] for a linear head on avg- or max-pooled maps (fp32).

    For max pooling the arg-max cell of each channel is the one `F.adaptive_max_pool2d` routes its gradient
    to, so the map equals the autograd one also where a channel has ties."""
    with torch.autocast(feature_maps.device.type, enabled=False):
        maps, class_weights = feature_maps.float(), weights.float()[labels]  # B x K x h x w, B x K
        b, k, h, w = maps.shape
        if pooling == "avg":
            return torch.einsum("bk,bkhw->bhw", class_weights, maps).relu() / (h * w)
        if pooling == "max":
            peaks, index = F.adaptive_max_pool2d(maps, 1, return_indices=True)  # B x K x 1 x 1 each
            contributions = class_weights * peaks.reshape(b, k)
            cam = torch.zeros(b, h * w, dtype=maps.dtype, device=maps.device)
            cam = cam.scatter_add(1, index.reshape(b, k), contributions)
            return cam.reshape(b, h, w).relu()
    raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")


def from_gradients(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_k G_k * A_k) in fp32: the element-wise map from a layer's activations and their gradients."""
    with torch.autocast(activations.device.type, enabled=False):
        return (gradients.float() * activations.float()).sum(dim=1).relu()


def autograd_map(logits: torch.Tensor, activations: torch.Tensor, labels: torch.Tensor,
                 create_graph: bool = True) -> torch.Tensor:
    """Element-wise Grad-CAM of `activations` (a tensor on the path to `logits`, not a detached copy) for
    class labels[b]; differentiable w.r.t. everything before it when `create_graph` (double backward)."""
    score = logits.float().gather(1, labels.reshape(-1, 1)).sum()
    (gradients,) = torch.autograd.grad(score, activations, retain_graph=True, create_graph=create_graph)
    return from_gradients(activations, gradients)


class GradCam(NamedTuple):
    logits: torch.Tensor  # B x C
    maps: torch.Tensor  # B x h x w, fp32, not normalised (see `normalise`)
    output: Any = None  # the model's whole output (models.net.ModelOutput), for losses that need more than logits


def class_maps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, layer: str | None = None,
               closed: bool | None = None, create_graph: bool = True,
               forward: Callable[[torch.Tensor], Any] | None = None) -> GradCam:
    """Run `model` (a models.net.Classifier) on `images` and return its logits and the Grad-CAM of `labels`.

    `layer`: a module name of `model` (its output is the layer's activations), or None for the head's
    feature maps (ModelOutput.feature_maps, what the head pools). `closed`: use the closed form (only for
    layer=None and a head with a linear form), the autograd path, or (None) the closed form where it applies.
    `forward`: what runs the images, if not `model` itself: in training the strategy's wrapper of it (DDP,
    DeepSpeed), whose gradient hooks must see the forward pass.
    Runs under whatever autocast the caller opened; the Grad-CAM math is fp32."""
    form = linear_form(model.head) if layer is None else None
    if closed and form is None:
        raise ValueError(f"the closed form needs layer=None and a head with a linear form ({sorted(LINEAR_FORMS)}); "
                         f"got layer={layer!r}, head kind {getattr(model.head, 'kind', None)!r}")
    if closed is None:
        closed = form is not None
    captured: list[torch.Tensor] = []
    hook = None
    if layer is not None:
        module = dict(model.named_modules()).get(layer)
        if module is None:
            raise ValueError(f"layer {layer!r} is not a module of the model")
        hook = module.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        output = (forward or model)(images)
    finally:
        if hook is not None:
            hook.remove()
    if closed:
        return GradCam(output.logits, closed_form(output.feature_maps, form.weights, labels, form.pooling), output)
    activations = captured[-1] if layer is not None else output.feature_maps
    return GradCam(output.logits, autograd_map(output.logits, activations, labels, create_graph), output)
