"""Two real processes (torchrun, gloo): in WebDataset exact mode and with FFCV the ranks see disjoint samples
whose union is the whole split, with equal batch counts (an all-reduce per batch proves no rank waits at the
epoch end); evaluation shards cover the test split once. And a `qpm-dist run` trains from WebDataset shards."""

import importlib.util
import json
import subprocess
import sys

import pytest

from data_helpers import convert
from helpers import REPO, clean_env, run_qpm, stage_dir


def probe(tmp_path, **fields):
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "dist_loader_probe.py"), str(out), *(f"{k}={v}" for k, v in fields.items())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=clean_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def check_exact_epochs(reports, train_size, test_size):
    assert reports[0]["batches_per_epoch"] == reports[1]["batches_per_epoch"] == train_size // 8
    for epoch in ("0", "1"):
        ranks = [[i for batch in r["epochs"][epoch] for i in batch] for r in reports]
        assert len(ranks[0]) == len(ranks[1]) == train_size // 2
        assert not set(ranks[0]) & set(ranks[1])
        assert sorted(ranks[0] + ranks[1]) == list(range(train_size))
    assert reports[0]["epochs"]["0"] != reports[0]["epochs"]["1"]
    assert sorted(reports[0]["eval"] + reports[1]["eval"]) == list(range(test_size))


def test_wds_exact_mode_two_processes(tiny_data, tmp_path):
    wds_dir = convert("wds", tiny_data, tmp_path / "wds", "--samples-per-shard", "24")
    reports = probe(tmp_path, dataset="synthetic", backend="wds", converted=wds_dir, img_size=32, num_workers=2)
    check_exact_epochs(reports, 128, 32)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ffcv") is None, reason="FFCV is not installed")
def test_ffcv_two_processes(tiny_data, tmp_path):
    ffcv_dir = convert("ffcv", tiny_data, tmp_path / "ffcv")
    reports = probe(tmp_path, dataset="synthetic", backend="ffcv", converted=ffcv_dir, img_size=32,
                    num_workers=1, augment="imagenet")
    check_exact_epochs(reports, 128, 32)


def test_training_run_reads_webdataset_shards(tiny_data, tmp_path, write_config):
    wds_dir = convert("wds", tiny_data, tmp_path / "wds", "--samples-per-shard", "32")
    config = write_config(data={"backend": "wds", "converted": str(wds_dir)}, dense={"epochs": 1})
    proc = run_qpm(2, "run", str(config), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "128 train / 32 test images" in proc.stderr
    result = json.loads((stage_dir(tmp_path / "runs-config", "dense") / "result.json").read_text())
    assert result["test"]["count"] == 32 and result["global_step"] == 128 // 16
    metrics = json.loads((stage_dir(tmp_path / "runs-config", "qpm_evaluate") / "metrics.json").read_text())
    assert "part_recovery" in metrics["qpm"]  # the ground truth travels in the shards' manifest
    # the shards hold no boxes: PG/SPG/CH score the source images of data.root, every test image once over 2 ranks
    assert metrics["qpm"]["pointing_images"] == 32 and 0 <= metrics["qpm"]["content_heatmap"] <= 1
    assert (stage_dir(tmp_path / "runs-config", "qpm_report") / "report.html").is_file()
