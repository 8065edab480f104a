"""Saving and loading trained classifiers.

A model file (`model.pt`) holds the state dict and, next to it, the head's registered type and constructor
options (`models.net.register_head`), so the classifier is rebuilt from the file and the backbone settings
(`model.*` of the config) alone:

    {"format": "qpm-dist/classifier", "version": 1,
     "head": {"kind": "sparse", "options": {"dropout": 0.1, ...}}, "state_dict": {...}}

A model whose backbone is cut at a layer (`models.truncation`, PixPNet) also holds `"backbone": {"layer": name}`:
the backbone is then `model.arch` cut after that layer, so every stage that loads the model (evaluation,
streaming, reports) rebuilds it without knowing which method trained it.

Files are read with `torch.load(weights_only=True)`: tensors and plain containers only, no pickled code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qpm_dist.config import ModelConfig
from qpm_dist.models.backbones import build_backbone
from qpm_dist.models.net import HEAD_TYPES, Classifier
from qpm_dist.models.protonet import PrototypeHead
from qpm_dist.models.sparse import SparseHead
from qpm_dist.models.truncation import TruncatedBackbone, truncated_backbone
from qpm_dist.utils import atomic_open

FORMAT, VERSION = "qpm-dist/classifier", 1
# imported here so that their type names are registered wherever models are read
BUILTIN_HEADS = (SparseHead, PrototypeHead)


def classifier_file(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """What `save_classifier` writes: `state` (default: the model's own, as CPU tensors) and the head's type."""
    if state is None:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # a view of a larger tensor (e.g. an index_select) is saved contiguous: readers may view it as bytes
    state = {k: v.contiguous() for k, v in state.items()}
    head = model.head
    saved = {"format": FORMAT, "version": VERSION, "head": {"kind": head.kind, "options": head.options()},
             "state_dict": state}
    if isinstance(model.backbone, TruncatedBackbone):
        saved["backbone"] = {"layer": model.backbone.layer}
    return saved


def save_classifier(path: Path, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the model file atomically (the caller decides which rank writes)."""
    with atomic_open(Path(path)) as fh:
        torch.save(classifier_file(model, state), fh)


def read_classifier_file(path: Path) -> dict[str, Any]:
    """The checked content of a model file; errors name the file."""
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling error means the same thing to the user
        raise ValueError(f"{path}: not a readable model file ({exc})") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path}: not a qpm-dist model file (written by an older qpm-dist? rerun the stage "
                         f"that wrote it)")
    if saved.get("version") != VERSION:
        raise ValueError(f"{path}: model file version {saved.get('version')}, this code reads version {VERSION}")
    kind = saved["head"]["kind"]
    if kind not in HEAD_TYPES:
        raise ValueError(f"{path}: head type {kind!r} is not registered here (known: {', '.join(sorted(HEAD_TYPES))}); "
                         f"import the module that defines it")
    return saved


def classifier_from_file(saved: dict[str, Any], model_cfg: ModelConfig) -> Classifier:
    """Rebuild backbone (from `model_cfg`) and head (from the file), and load the state dict strictly."""
    layer = saved.get("backbone", {}).get("layer")
    if layer is not None:
        backbone = truncated_backbone(model_cfg.arch, layer, model_cfg.reduced_strides, model_cfg.norm,
                                      model_cfg.tiny_width)
    else:
        backbone = build_backbone(model_cfg.arch, model_cfg.reduced_strides, model_cfg.norm, model_cfg.tiny_width)
    state = saved["state_dict"]
    head_state = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
    head = HEAD_TYPES[saved["head"]["kind"]].from_state(saved["head"]["options"], head_state)
    model = Classifier(backbone, head)
    model.load_state_dict(state, strict=True)
    return model


def load_classifier(path: Path, model_cfg: ModelConfig) -> Classifier:
    return classifier_from_file(read_classifier_file(path), model_cfg)


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A hash of every tensor of a state dict (to prove that all ranks hold the same model)."""
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
