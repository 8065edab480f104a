"""Saving and loading trained classifiers as plain state dicts.

A sparse model's state dict carries its head's selection, weight, mean and std, so the architecture is
rebuilt from the file alone (plus the model config for the backbone).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qpm_dist.config import Config
from qpm_dist.models.backbones import build_backbone
from qpm_dist.models.net import Classifier, DenseHead
from qpm_dist.models.sparse import SparseHead


def read_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def sparse_head_options(cfg: Config) -> dict:
    """Dropout and trainability of the sparse head for the config's method (not stored in a state dict).

    QPM freezes the head's mean/std; SLDD and Q-SENN fine-tune them (specs/qsenn_sldd.md §1).
    """
    section = {"sldd": cfg.sldd, "qsenn": cfg.qsenn}.get(cfg.method)
    if section is None:
        return {"dropout": cfg.qpm.dropout, "dropout_before_norm": cfg.qpm.dropout_before_norm}
    return {"dropout": section.dropout, "dropout_before_norm": section.dropout_before_norm,
            "train_normalisation": section.train_normalisation}


def classifier_from_state(cfg: Config, num_classes: int, state: dict[str, torch.Tensor]) -> Classifier:
    """Rebuild a dense or sparse classifier from its state dict and load it (strictly)."""
    m = cfg.model
    backbone = build_backbone(m.arch, m.reduced_strides, m.norm, m.tiny_width)
    if "head.selection" in state:
        head: nn.Module = SparseHead(state["head.selection"], state["head.weight"], state["head.mean"],
                                     state["head.std"], bias=state.get("head.bias"), **sparse_head_options(cfg))
    else:
        head = DenseHead(backbone.num_features, num_classes, m.dropout)
    model = Classifier(backbone, head)
    model.load_state_dict(state, strict=True)
    return model


def load_classifier(cfg: Config, num_classes: int, path: Path) -> Classifier:
    return classifier_from_state(cfg, num_classes, read_state(path))


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A hash of every tensor of a state dict (to prove that all ranks hold the same model)."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
