"""The PixPNet evaluate stage on the tiny synthetic data with a seeded, pushed tiny prototype model (a tiny ResNet
cut at layer2: an 8 x 8 grid at 32 px whose border cells' receptive fields are clipped, so the RF centres differ
from the naive cell centres), shared by test_pixpnet_eval.py and, under torchrun, the 2-process check:

    torchrun --nproc-per-node 2 tests/pixpnet_eval_probe.py DATA_ROOT OUT_DIR

Every rank runs the stage; rank 0's metrics.json is OUT_DIR/metrics.json.
"""

import json
import sys
from pathlib import Path

import torch

from qpm_dist import dist
from qpm_dist.config import load_config
from qpm_dist.data.sources import read_splits
from qpm_dist.methods.pixpnet_eval import PixPNetEvalConfig, PixPNetEvaluateStage
from qpm_dist.methods.pixpnet_push import push_prototypes
from qpm_dist.models.net import Classifier
from qpm_dist.models.protonet import PrototypeHead
from qpm_dist.models.truncation import truncated_backbone
from qpm_dist.stages.runner import RunContext

SETTINGS = PixPNetEvalConfig(batch_size=8, rot_samples=5, rot_step_fraction=0.1, rot_batch_size=16)
PER_CLASS = 2
PUSH_BATCH = 8


def probe_config(root, out_dir):
    return load_config(None, [f"data.root={root}", "data.dataset=synthetic", "data.img_size=32", "data.num_workers=0",
                              f"run.out_dir={out_dir}", "eval.batch_size=16", "engine.precision=fp32",
                              "engine.progress=false", "model.arch=tiny_resnet", "model.tiny_width=8",
                              "qpm.n_features=6", "qpm.n_per_class=2"])


def probe_model(data, info) -> Classifier:
    """Seeded, then pushed (every prototype a training patch; source_sample / source_cell set)."""
    torch.manual_seed(0)
    backbone = truncated_backbone("tiny_resnet", "layer2", tiny_width=8)
    model = Classifier(backbone, PrototypeHead(backbone.num_features, data.num_classes, PER_CLASS, dim=8))
    loader = data.eval_loader("train", PUSH_BATCH, info.rank, info.world_size, return_index=True)
    push_prototypes(model, loader, PUSH_BATCH, info.device)
    return model.eval()


def run_stage(root, out_dir, info, settings=SETTINGS, data=None):
    """(the stage's summary, metrics.json, the model, the context)."""
    cfg = probe_config(root, out_dir)
    data = data or read_splits(cfg.data, cfg.run.seed)
    model = probe_model(data, info)
    ctx = RunContext(cfg=cfg, info=info, run_dir=Path(out_dir), data=data)
    stage = PixPNetEvaluateStage("pixpnet_train", lambda c: settings, lambda c: PER_CLASS, load=lambda ctx, s: model)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    summary = stage.run(ctx, Path(out_dir))
    return summary, json.loads((Path(out_dir) / "metrics.json").read_text()), model, ctx


if __name__ == "__main__":
    root, out = sys.argv[1:3]
    info = dist.init("cpu")
    try:
        run_stage(root, out, info)
    finally:  # exiting with a live gloo group aborts now and then
        dist.shutdown()
