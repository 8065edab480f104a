"""Training reaches the solver service by URL (or the URL file the SLURM job writes); when the service is
down, the client retries with messages naming the URL and then, by option, solves in process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import REPO, clean_env, run_qpm, stage_dir, write_test_config

TINY_QPM = dict(qpm={"n_features": 6, "n_per_class": 2, "solver": {"time_limit": 30, "retries": 1}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A solver service on loopback with a token, as slurm/solver_service.sbatch starts it."""
    workdir = tmp_path_factory.mktemp("service")
    env = {**clean_env(), "SOLVER_SERVICE_TOKEN": "s3cret"}
    proc = subprocess.Popen([sys.executable, "-m", "solver_service", "-q", "serve", "--port", "0", "--workdir",
                             str(workdir)], env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    url = line.split()[-1]
    url_file = workdir / "solver.url"  # what the SLURM job publishes on the shared file system
    url_file.write_text(url + "\n")
    (workdir / "solver.url.token").write_text("s3cret\n")
    yield url, url_file, workdir
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def stats_ready(tmp_path_factory, tiny_data):
    """A run folder whose dense and stats stages are finished; each test then only solves."""
    tmp = tmp_path_factory.mktemp("solve")
    config = write_test_config(tmp / "config.yaml", tiny_data, tmp / "runs", dense={"epochs": 1}, **TINY_QPM)
    proc = run_qpm(1, "run", str(config), "--stage", "stats")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return config


def solve(config: Path, *overrides: str):
    return run_qpm(1, "run", str(config), "--stage", "qpm_solve", *overrides, timeout=300)


def newest_solve(config: Path) -> Path:
    out = Path(yaml.safe_load(config.read_text())["run"]["out_dir"])
    return max(out.glob("*/qpm_solve-*"), key=lambda p: p.stat().st_mtime)


def test_solve_through_the_service_url_file_with_token_and_cache(stats_ready, service):
    import shutil

    url, url_file, workdir = service
    proc = solve(stats_ready, f"qpm.solver.url={url_file}", "qpm.solver.time_limit=31")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitting problem" in proc.stderr and url in proc.stderr
    (job,) = list((workdir / "jobs").iterdir())
    assert (job / "result.npz").is_file()
    first = np.load(newest_solve(stats_ready) / "result.npz")
    assert len(first["selected"]) == 6
    # a restarted job with a fresh run folder (same finished dense/stats stages) asks again: answered from
    # the service's cache, not solved a second time
    cfg = yaml.safe_load(stats_ready.read_text())
    old_out = Path(cfg["run"]["out_dir"])
    cfg["run"]["out_dir"] = str(old_out) + "-restarted"
    other = stats_ready.with_name("restarted.yaml")
    other.write_text(yaml.safe_dump(cfg))
    for stage in ("dense", "stats"):
        src = stage_dir(old_out, stage)
        shutil.copytree(src, Path(cfg["run"]["out_dir"]) / src.parent.name / src.name)
    again = solve(other, f"qpm.solver.url={url_file}", "qpm.solver.time_limit=31")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.name for p in (workdir / "jobs").iterdir()] == [job.name]
    assert json.loads((job / "state.json").read_text())["solves"] == 1
    second = np.load(newest_solve(other) / "result.npz")
    np.testing.assert_array_equal(first["selected"], second["selected"])


def test_wrong_token_is_refused_with_a_clear_message(stats_ready, service):
    url, _, _ = service
    proc = solve(stats_ready, f"qpm.solver.url={url}", "qpm.solver.fallback_local=false",
                 "qpm.solver.time_limit=32")
    assert proc.returncode != 0
    assert "HTTP 401" in proc.stderr or "HTTP 403" in proc.stderr


def test_service_down_retries_then_solves_in_process(stats_ready):
    url = f"http://127.0.0.1:{free_port()}"
    proc = solve(stats_ready, f"qpm.solver.url={url}", "qpm.solver.time_limit=33")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "retrying in" in proc.stderr and url in proc.stderr
    assert "solving in process with the open-source backends" in proc.stderr
    assert len(np.load(newest_solve(stats_ready) / "result.npz")["selected"]) == 6


def test_service_down_without_fallback_fails_naming_the_url(stats_ready):
    url = f"http://127.0.0.1:{free_port()}"
    proc = solve(stats_ready, f"qpm.solver.url={url}", "qpm.solver.fallback_local=false",
                 "qpm.solver.time_limit=34")
    assert proc.returncode != 0
    assert f"could not reach the solver service at {url}" in proc.stderr
