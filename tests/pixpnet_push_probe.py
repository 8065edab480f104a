"""Run under torchrun by test_pixpnet_push.py (or imported, for the one-process run): every rank pushes the
prototypes of the same seeded tiny PixPNet model over its shard of 37 synthetic training images (an uneven split:
19 and 18 on 2 ranks), and writes its record and prototype tensor to OUT.rank<R>.pt.

The 37 images: 20 of class 0, 15 of class 1, 2 of class 2 (fewer than its 3 prototypes), none of class 3.

    torchrun --nproc-per-node 2 tests/pixpnet_push_probe.py DATA_ROOT OUT
"""

import dataclasses
import sys

import numpy as np
import torch

from qpm_dist import dist
from qpm_dist.config import DataConfig
from qpm_dist.data.datasets import DatasetBundle, Split
from qpm_dist.data.sources import read_splits
from qpm_dist.methods.pixpnet_push import push_prototypes
from qpm_dist.models.backbones import TinyResNet
from qpm_dist.models.net import Classifier
from qpm_dist.models.protonet import PrototypeHead

PUSH_BATCH = 4  # per rank, the same for every world size
PER_CLASS_TAKEN = (20, 15, 2, 0)


def probe_data(root: str) -> DatasetBundle:
    data = read_splits(DataConfig(dataset="synthetic", root=root, img_size=32, num_workers=0))
    train, labels = data.train_split, data.train_split.labels
    rows = np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in enumerate(PER_CLASS_TAKEN)])
    rows = np.random.default_rng(0).permutation(rows)  # classes interleaved in the index order
    subset = Split(train.image_dir, [train.paths[i] for i in rows], labels[rows])
    return dataclasses.replace(data, train_split=subset)


def probe_model(num_classes: int) -> Classifier:
    torch.manual_seed(0)
    backbone = TinyResNet(width=8, reduced_strides=True)
    return Classifier(backbone, PrototypeHead(backbone.num_features, num_classes, prototypes_per_class=3, dim=16))


def push(root: str, info) -> dict:
    data = probe_data(root)
    model = probe_model(data.num_classes)
    before = model.head.prototypes.detach().clone()
    loader = data.eval_loader("train", PUSH_BATCH, info.rank, info.world_size, return_index=True)
    record = push_prototypes(model, loader, PUSH_BATCH, info.device)
    return {"record": record._asdict(), "prototypes": model.head.prototypes.detach().clone(), "before": before,
            "source_sample": model.head.source_sample.clone(), "source_cell": model.head.source_cell.clone()}


if __name__ == "__main__":
    root, out = sys.argv[1:3]
    info = dist.init("cpu")
    try:
        torch.save(push(root, info), f"{out}.rank{info.rank}.pt")
    finally:  # exiting with a live gloo group aborts now and then
        dist.shutdown()
