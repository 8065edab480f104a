"""The sparse head of QPM and the glm-based methods (specs/qpm.md §3.4, §5.9).

Feature maps are indexed to the n selected channels before pooling, so everything downstream (the maps the
feature diversity loss and the metrics read, the pooled features) lives in the selected space. Pooled
features are normalised with the dense model's training mean/std and multiplied by a frozen C x n weight
(QPM: the binary assignment from the solver, no bias, mean/std frozen).

Dropout (p = 0.1) acts on the normalised features by default, so a dropped unit contributes exactly
nothing; the reference drops raw pooled features before normalising, so a dropped unit becomes −μ/σ
(spec bug 23) — `dropout_before_norm=True` reproduces that.
"""

from __future__ import annotations

import torch
from torch import nn

from qpm_dist.models.net import ModelOutput, register_head


def _own_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous fp32 copy: the solver's assignment is column-major, and a strided parameter would reach
    checkpoints and DeepSpeed's broadcast of the model, which views each tensor as bytes."""
    return tensor.float().clone(memory_format=torch.contiguous_format)


@register_head("sparse")
class SparseHead(nn.Module):
    def __init__(self, selection: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 bias: torch.Tensor | None = None, dropout: float = 0.1, train_normalisation: bool = False,
                 dropout_before_norm: bool = False) -> None:
        super().__init__()
        selection = torch.as_tensor(selection, dtype=torch.long)
        n = selection.numel()
        if weight.shape[1] != n:
            raise ValueError(f"weight has {weight.shape[1]} columns for {n} selected features")
        if mean.numel() != n:  # full-length statistics are indexed by the selection
            mean, std = mean[selection], std[selection]
        self.register_buffer("selection", selection.contiguous())
        self.mean = nn.Parameter(_own_copy(mean), requires_grad=train_normalisation)
        self.std = nn.Parameter(_own_copy(std), requires_grad=train_normalisation)
        self.weight = nn.Parameter(_own_copy(weight), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(_own_copy(bias), requires_grad=False)
        self.dropout = nn.Dropout(dropout)
        self.dropout_before_norm = dropout_before_norm
        self.train_normalisation = train_normalisation

    def options(self) -> dict:
        return {"dropout": self.dropout.p, "dropout_before_norm": self.dropout_before_norm,
                "train_normalisation": self.train_normalisation}

    @classmethod
    def from_state(cls, options: dict, state: dict[str, torch.Tensor]) -> "SparseHead":
        return cls(state["selection"], state["weight"], state["mean"], state["std"], bias=state.get("bias"),
                   **options)

    def class_weights(self) -> torch.Tensor:
        return self.weight

    def forward(self, feature_maps: torch.Tensor) -> ModelOutput:
        maps = feature_maps.index_select(1, self.selection)
        pooled = maps.mean(dim=(2, 3))
        if self.dropout_before_norm:
            pooled = self.dropout(pooled)
        z = (pooled - self.mean) / self.std.clamp_min(1e-6)
        if not self.dropout_before_norm:
            z = self.dropout(z)
        logits = nn.functional.linear(z, self.weight, self.bias)
        return ModelOutput(logits, maps, z)
