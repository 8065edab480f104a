"""`engine.strategy=deepspeed` with one process and no launcher (issue 13, item 5): the README's own example
`qpm-dist run configs/demo.yaml --stage dense engine.strategy=deepspeed` failed in deepspeed.initialize with
"AssertionError: Distributed backend is not initialized"."""

from __future__ import annotations

import json
import os

import torch

from helpers import assert_same_weights, load_weights, run_in_process, run_qpm, stage_dir


def test_ensure_group_gives_a_lone_process_a_one_process_group_and_shutdown_removes_it(monkeypatch):
    from qpm_dist import dist

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert not torch.distributed.is_initialized()
    dist.ensure_group(torch.device("cpu"))
    try:
        assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
        assert os.environ["LOCAL_RANK"] == "0"  # DeepSpeed reads it; only launchers set it
        assert (dist.rank(), dist.world_size(), dist.is_distributed()) == (0, 1, False)  # helpers stay no-ops
        dist.ensure_group(torch.device("cpu"))  # idempotent
    finally:
        dist.shutdown()
    assert not torch.distributed.is_initialized() and "LOCAL_RANK" not in os.environ


def test_deepspeed_trains_in_one_process_without_a_launcher_and_equals_ddp(write_config):
    """One subprocess started as users start it (no torchrun variables); ZeRO-1 in fp32 on one process computes
    what the DDP path computes in process."""
    proc = run_qpm(1, "run", str(write_config("ds.yaml", engine={"strategy": "deepspeed"})), "--stage", "dense")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = stage_dir(write_config("ds.yaml").parent / "runs-ds")
    result = json.loads((run / "result.json").read_text())
    assert (result["strategy"], result["world_size"], result["global_step"]) == ("deepspeed", 1, 16)
    _, ctx = run_in_process(write_config("ddp.yaml"), stage="dense")
    assert_same_weights(load_weights(ctx.outputs["dense"] / "model.pt"), load_weights(run / "model.pt"), atol=1e-5)
