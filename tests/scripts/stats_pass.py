"""Run the streamed statistics pass of a seeded tiny model over a dataset; save the all-reduced sums.

    [torchrun --nproc-per-node 2] tests/scripts/stats_pass.py DATA_ROOT OUT.npz
"""

import sys
from pathlib import Path

from qpm_dist import dist
from qpm_dist.config import load_config
from qpm_dist.data.sources import build_datasets
from qpm_dist.engine.evaluate import autocast_for
from qpm_dist.methods.common import build_dense_model
from qpm_dist.stats.accumulate import collect_feature_sums

root, out = sys.argv[1], Path(sys.argv[2])
info = dist.init("cpu")
cfg = load_config(None, ["model.arch=tiny_resnet", "model.tiny_width=8", "qpm.n_features=6", f"data.root={root}",
                         "data.img_size=32", "data.num_workers=0"])
data = build_datasets(cfg.data, seed=0)
model = build_dense_model(cfg, data.num_classes)
loader = data.eval_loader("train", 8, info.rank, info.world_size)
sums = collect_feature_sums(model, loader, data.num_classes, info.device, autocast_for("fp32", info.device))
if info.is_main:
    sums.save(out)
dist.shutdown()
