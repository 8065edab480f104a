"""Run under torchrun by test_gc.py, in ONE launch (starting torch and the group costs ~25 s on 2 loaded cores):

1. one GC step under DDP with 2 ranks, each on its half of a fixed global batch, against one process computing
   the same two halves as two accumulated micro-batches: the task forwards the DDP module twice (positives, then
   composites) before one backward, and the double-backward Grad-CAM path differentiates through it, so this
   checks that DDP still averages exactly the gradient one process computes, for the closed form and autograd;
   rank 0 writes the largest differences as JSON;
2. then the `qpm-dist run` commands given (tests/runs_in_one_group.py).

    torchrun --nproc-per-node 2 tests/gc_ddp_probe.py OUT.json "CONFIG --stage gc_train" ...
"""

import copy
import json
import sys

import torch

import runs_in_one_group
from qpm_dist import dist
from qpm_dist.config import PhaseConfig
from qpm_dist.data.batch import Batch
from qpm_dist.engine.strategy import DDPStrategy
from qpm_dist.methods.gc import ConsistencyTask, GCConfig
from test_gc import Bare, composite_batch, tiny_model


def half(batch: Batch, rank: int, world: int) -> Batch:
    return Batch({k: v[rank::world] for k, v in batch.items()})


def step_differences(info, closed_form: str, pooling: str) -> dict:
    """Largest |DDP gradient - one-process gradient| and |rank 0's - rank 1's gradient| of one step."""
    batch = composite_batch(b=8, size=16, seed=3)  # the same on every rank; composites from the whole batch
    task = ConsistencyTask(GCConfig(lam=25.0, negatives="in_batch", closed_form=closed_form), PhaseConfig(fdl_beta=0))
    model = tiny_model(pooling)
    single = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = DDPStrategy(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), info,
                           precision="fp32", channels_last=False, grad_accum=1, clip_grad_norm=None)
    strategy.module.train()
    loss, _ = task.step(half(batch, info.rank, info.world_size), strategy)
    strategy.backward(loss)
    ddp = torch.cat([p.grad.flatten() for p in strategy.module.parameters()])
    for rank in range(info.world_size):  # one process: the ranks' halves as accumulated micro-batches
        part, _ = task.step(half(batch, rank, info.world_size), Bare(single))
        (part / info.world_size).backward()
    one = torch.cat([p.grad.flatten() for p in single.parameters()])
    ranks = dist.all_gather_object(ddp)
    return {"vs_one_process": float((ddp - one).abs().max()), "across_ranks": float((ranks[0] - ranks[1]).abs().max()),
            "gradient_norm": float(one.norm())}


if __name__ == "__main__":
    out, commands = sys.argv[1], sys.argv[2:]
    info = dist.init("cpu")
    try:
        result = {f"{closed}-{pooling}": step_differences(info, closed, pooling)
                  for closed in ("always", "never") for pooling in ("avg", "max")}
        if info.rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
    except BaseException:
        dist.shutdown()  # exiting with a live gloo group aborts now and then
        raise
    sys.exit(runs_in_one_group.main(commands))  # reuses the group, shuts it down at its end
