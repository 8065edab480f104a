"""Run under torchrun by test_loaders_dist.py: every rank iterates its training and evaluation loaders the
way the trainer does (an all-reduce after every batch: unequal batch counts would hang or fail), then rank 0
writes what each rank saw as JSON.

    torchrun --nproc-per-node 2 tests/dist_loader_probe.py OUT.json key=value ...  (DataConfig fields)
"""

import json
import sys

import torch
import torch.distributed as torch_dist

from qpm_dist import dist
from qpm_dist.config import DataConfig
from qpm_dist.data.sources import build_datasets


def main() -> None:
    out, fields = sys.argv[1], dict(arg.split("=", 1) for arg in sys.argv[2:])
    fields = {k: (int(v) if v.isdigit() else v) for k, v in fields.items()}
    info = dist.init("cpu")
    source = build_datasets(DataConfig(**fields), seed=5)  # after the process group, as FFCV needs
    loader = source.train_loader(4, 4 * info.world_size, info.rank, info.world_size, return_index=True)
    report = {"batches_per_epoch": loader.batches_per_epoch, "epochs": {}, "eval": []}
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        seen = []
        for _, _, indices in loader:
            seen.append(indices.tolist())
            step = torch.ones(1)
            torch_dist.all_reduce(step)  # every rank must take part in every step
        report["epochs"][epoch] = seen
    for _, _, indices in source.eval_loader("test", 6, info.rank, info.world_size, return_index=True):
        report["eval"] += indices.tolist()
    reports = dist.all_gather_object(report)
    if info.is_main:
        with open(out, "w") as fh:
            json.dump(reports, fh)
    dist.shutdown()


if __name__ == "__main__":
    main()
