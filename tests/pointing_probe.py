"""Run under torchrun by test_pointing.py: every rank scores its shard of the synthetic test split with the same
tiny model (seeded), and rank 0 writes the all-reduced pointing metrics as JSON: on the test transform's view, on
the whole image (eval.pointing_resize), and through the autograd path (a head without a linear form).

    torchrun --nproc-per-node 2 tests/pointing_probe.py DATA_ROOT OUT.json
"""

import contextlib
import json
import sys

import torch

from qpm_dist import dist
from qpm_dist.config import DataConfig, ModelConfig
from qpm_dist.data.sources import read_splits
from qpm_dist.metrics.pointing import pointing_metrics
from qpm_dist.models.net import DenseHead, build_model


class AutogradHead(DenseHead):
    """The dense head under a kind gradcam.LINEAR_FORMS does not know: its Grad-CAM takes the autograd path."""

    kind = None


def tiny_model(num_classes: int, head_type=None):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="tiny_resnet", tiny_width=8), num_classes)
    if head_type is not None:
        head = head_type(model.head.linear.in_features, num_classes)
        head.load_state_dict(model.head.state_dict())
        model.head = head
    return model


def tiny_model_metrics(root: str, info) -> dict:
    """The metrics of the three paths, keyed by path."""
    data = read_splits(DataConfig(dataset="synthetic", root=root, img_size=32, num_workers=0))
    score = lambda model, resize=None: pointing_metrics(model, data, info, contextlib.nullcontext, batch_size=4,
                                                        resize=resize)
    return {"test_transform": score(tiny_model(data.num_classes)),
            "full_image": score(tiny_model(data.num_classes), resize=40),
            "autograd": score(tiny_model(data.num_classes, AutogradHead))}


if __name__ == "__main__":
    root, out = sys.argv[1:3]
    info = dist.init("cpu")
    try:
        result = tiny_model_metrics(root, info)
        if info.rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
    finally:  # exiting with a live gloo group aborts now and then ("terminate called without an active exception")
        dist.shutdown()
