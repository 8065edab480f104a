"""Run the streamed statistics pass of a seeded tiny model over a dataset; save the all-reduced sums.

    [torchrun --nproc-per-node 2] tests/scripts/stats_pass.py DATA_ROOT OUT.npz
"""

import sys
from pathlib import Path

from qpm_dist import dist
from qpm_dist.config import load_config
from qpm_dist.data.sources import build_datasets
from qpm_dist.engine.evaluate import autocast_for
from qpm_dist.engine.streaming import model_outputs
from qpm_dist.methods.qpm import QPMStatistics
from qpm_dist.stages.train import build_dense_model

root, out = sys.argv[1], Path(sys.argv[2])
info = dist.init("cpu")
cfg = load_config(None, ["model.arch=tiny_resnet", "model.tiny_width=8", "qpm.n_features=6", f"data.root={root}",
                         "data.img_size=32", "data.num_workers=0"])
data = build_datasets(cfg.data, seed=0)
model = build_dense_model(cfg, data.num_classes)
loader = data.eval_loader("train", 8, info.rank, info.world_size)
stats = QPMStatistics(model, data.num_classes, info.device)  # the stats stage's accumulator
for output, labels in model_outputs(model, loader, info, autocast_for("fp32", info.device)):
    stats.update("train", output, labels)
sums = stats.sums.all_reduce()
if info.is_main:
    sums.save(out)
dist.shutdown()
