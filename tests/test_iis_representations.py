"""The IIS representation pass (issue 17 item 2): 2 processes write the rows of 1, the rows are the model's full
pooled backbone vector, and the heads trained over the shards agree between 1 and 2 processes."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO, clean_env
from qpm_dist.iis.representations import HeadInput, Representations, pool
from qpm_dist.models.net import Classifier, DenseHead
from qpm_dist.models.sparse import SparseHead

SCRIPT = str(REPO / "tests" / "scripts" / "iis_pass.py")


@pytest.fixture(scope="module")
def passes(tiny_data, tmp_path_factory):
    """tests/scripts/iis_pass.py with 1 process (this one: no second interpreter start) and with 2 (torchrun,
    gloo): their output folders."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    spec = importlib.util.spec_from_file_location("iis_pass", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        script.main(str(tiny_data), one)  # one thread, as each torchrun rank (clean_env)
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", SCRIPT,
           str(tiny_data), str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one, two


def test_two_processes_write_the_rows_of_one_bitwise(passes, tiny_data):
    one, two = (Representations(p / "features") for p in passes)
    assert (one.world_size_written, two.world_size_written) == (1, 2)
    assert one.dim == two.dim == 32  # the full backbone vector, not the sparse head's 6 selected channels
    assert one.meta["pooling"] == "avg" and one.meta["num_classes"] == 4
    for split, rows in (("train", 128), ("test", 32)):
        (xa, ya), (xb, yb) = one.in_sample_order(split), two.in_sample_order(split)
        assert xa.dtype == xb.dtype == np.float16 and xa.shape == (rows, 32)
        assert xa.tobytes() == xb.tobytes() and np.array_equal(ya, yb)
        assert [two.shard(split, s)[0].shape[0] for s in (0, 1)] == [rows // 2, rows // 2]
        assert np.isfinite(xa).all() and np.abs(xa).max() > 0


def test_the_rows_are_the_pooled_backbone_maps(passes, tiny_data):
    """Recomputed here, directly from the saved model's backbone, in sample order."""
    from qpm_dist.config import load_config
    from qpm_dist.data.sources import build_datasets
    from qpm_dist.models.io import load_classifier

    cfg = load_config(None, ["model.arch=tiny_resnet", "model.tiny_width=8", "qpm.n_features=6",
                             f"data.root={tiny_data}", "data.img_size=32", "data.num_workers=0"])
    model = load_classifier(passes[0] / "model" / "model.pt", cfg.model).eval()
    images, labels = next(iter(build_datasets(cfg.data, seed=0).eval_loader("test", 32, 0, 1)))
    with torch.no_grad():
        expected = model.backbone(images).mean(dim=(2, 3))
    x, y = Representations(passes[0] / "features").in_sample_order("test")
    assert np.array_equal(y, labels.numpy())
    torch.testing.assert_close(torch.from_numpy(x).float(), expected.half().float(), atol=2e-3, rtol=2e-3)


def test_heads_over_shards_agree_between_one_and_two_processes(passes):
    one, two = (json.loads((p / "heads.json").read_text())["heads"] for p in passes)
    for library in ("dense", "planted"):
        a, b = one[library], two[library]
        assert len(set(b["digests"])) == 1  # both ranks hold the same head
        assert (a["record"]["world_size"], b["record"]["world_size"]) == (1, 2)
        for key in ("accuracy", "top5", "selection_accuracy", "epoch", "rows"):
            assert a["record"][key] == b["record"][key], key
        assert a["record"]["rows"] == {"train": 96, "selection": 32, "test": 32}
        for name, value in a["state"].items():  # the same trajectory up to the all-reduce's summation order
            torch.testing.assert_close(torch.tensor(b["state"][name]), torch.tensor(value), atol=1e-5, rtol=1e-5)
        for ha, hb in zip(a["history"], b["history"]):
            assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-5)


def test_head_input_is_the_full_vector_pooled_as_the_head_pools():
    maps = torch.rand(3, 5, 4, 4)
    backbone = torch.nn.Identity()
    backbone.num_features = 5
    sparse = Classifier(backbone, SparseHead(torch.tensor([0, 3]), torch.ones(2, 2), torch.zeros(5), torch.ones(5)))
    capture = HeadInput(sparse)
    out = sparse(maps)
    assert out.features.shape == (3, 2)  # the sparse head's own vector: the selected channels
    assert torch.equal(capture(out), maps.mean(dim=(2, 3)))
    gmp = Classifier(backbone, DenseHead(5, 2, pooling="max"))
    capture = HeadInput(gmp)
    assert torch.equal(capture(gmp(maps)), maps.amax(dim=(2, 3))) and capture.pooling == "max"
    with pytest.raises(RuntimeError, match="no representation captured"):
        capture(out)
    assert torch.equal(pool(maps, "avg"), maps.mean(dim=(2, 3)))
