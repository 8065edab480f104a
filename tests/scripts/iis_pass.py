"""The IIS representation pass and two head jobs over its shards, as a method module would run them; for
test_iis_representations.py, which runs it with 1 process and under torchrun with 2 and compares.

    [torchrun --nproc-per-node 2] tests/scripts/iis_pass.py DATA_ROOT OUT_DIR

The model is a seeded tiny ResNet with a SPARSE head (6 of its 32 channels selected), so the shards must hold the
full 32-channel backbone vector. Writes OUT_DIR/model/model.pt, OUT_DIR/features/shards/*, and (rank 0)
OUT_DIR/heads.json: each job's record, its selected weights, and every rank's digest of them.
"""

import json
import sys
from pathlib import Path

import torch

from qpm_dist import dist
from qpm_dist.config import load_config
from qpm_dist.data.sources import build_datasets
from qpm_dist.iis.heads import HeadJob, HeadOptions, train_head
from qpm_dist.iis.representations import Representations, iis_features
from qpm_dist.models.io import save_classifier, state_digest
from qpm_dist.models.net import Classifier
from qpm_dist.models.sparse import SparseHead
from qpm_dist.stages.artifacts import MODEL
from qpm_dist.stages.runner import RunContext
from qpm_dist.stages.train import build_dense_model

PER_RANK_BATCH = 8  # the same per-rank batches with 1 and 2 processes


def main(root: str, out: Path) -> None:
    torch.set_num_threads(1)
    info = dist.init("cpu")
    cfg = load_config(None, ["model.arch=tiny_resnet", "model.tiny_width=8", "qpm.n_features=6", f"data.root={root}",
                             "data.img_size=32", "data.num_workers=0", "engine.precision=fp32", "engine.progress=false"])
    data = build_datasets(cfg.data, seed=0)
    dense = build_dense_model(cfg, data.num_classes)  # seeded: the same on every rank and in every run
    generator = torch.Generator().manual_seed(1)
    head = SparseHead(torch.tensor([1, 4, 9, 16, 25, 30]), torch.randn(data.num_classes, 6, generator=generator),
                      torch.zeros(32), torch.ones(32))
    model_dir, features_dir = out / "model", out / "features"
    if info.is_main:
        model_dir.mkdir(parents=True, exist_ok=True)
        save_classifier(model_dir / MODEL, Classifier(dense.backbone, head))
    features_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    ctx = RunContext(cfg=cfg, info=info, run_dir=out, data=data, outputs={"model": model_dir})
    stage = iis_features("iis_features", "model", batch_size=lambda cfg: PER_RANK_BATCH * info.world_size)
    summary = stage.run(ctx, features_dir)

    reps = Representations(features_dir)
    prototypes = torch.randn(8, reps.dim, generator=generator)
    options = HeadOptions(epochs=3, batch_size=16, holdout=0.25, seed=2, eval_batch_size=10)
    results = {}
    for job, protos in ((HeadJob("dense", None, 0.05), None), (HeadJob("planted", 0.5, 0.05), prototypes)):
        result = train_head(reps, job, options, protos)
        results[job.library] = {"record": result.record, "history": result.history,
                                "state": {k: v.tolist() for k, v in result.state_dict.items()},
                                "digests": dist.all_gather_object(state_digest(result.state_dict))}
    if info.is_main:
        (out / "heads.json").write_text(json.dumps({"summary": summary, "heads": results}))
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
