"""Training reaches the solver service by URL (or the URL file the SLURM job writes); when the service is
down, the client retries with messages naming the URL and then, by option, solves in process.

The service is a separate process, as on a cluster; the training side (`qpm-dist run --stage qpm_solve`) runs in
this process (`cli.main`): one rank, which is the one that talks to the service."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import REPO, clean_env, run_in_process, stage_dir, write_test_config
from qpm_dist.cli import main

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
    run_in_process(config, stage="stats")
    return config


def solve(config: Path, *overrides: str) -> int:
    return main(["run", str(config), "--stage", "qpm_solve", *overrides])


def newest_solve(config: Path) -> Path:
    out = Path(yaml.safe_load(config.read_text())["run"]["out_dir"])
    return max(out.glob("*/qpm_solve-*"), key=lambda p: p.stat().st_mtime)


def test_solve_through_the_service_url_file_with_token_and_cache(stats_ready, service, capsys):
    import shutil

    url, url_file, workdir = service
    assert solve(stats_ready, f"qpm.solver.url={url_file}", "qpm.solver.time_limit=31") == 0
    log = capsys.readouterr().err
    assert "submitting problem" in log and url in log
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
    assert solve(other, f"qpm.solver.url={url_file}", "qpm.solver.time_limit=31") == 0
    assert [p.name for p in (workdir / "jobs").iterdir()] == [job.name]
    assert json.loads((job / "state.json").read_text())["solves"] == 1
    second = np.load(newest_solve(other) / "result.npz")
    np.testing.assert_array_equal(first["selected"], second["selected"])


def test_wrong_token_is_refused_with_a_clear_message(stats_ready, service, capsys):
    url, _, _ = service
    assert solve(stats_ready, f"qpm.solver.url={url}", "qpm.solver.fallback_local=false",
                 "qpm.solver.time_limit=32") == 69
    assert re.search(r"qpm-dist: error: the solver service failed: .*HTTP 40[13]", capsys.readouterr().err)


def test_service_down_retries_then_solves_in_process(stats_ready, capsys, caplog):
    url = f"http://127.0.0.1:{free_port()}"
    assert solve(stats_ready, f"qpm.solver.url={url}", "qpm.solver.time_limit=33") == 0
    assert "retrying in" in caplog.text and url in caplog.text  # the client's log (solver_service.client)
    assert "solving in process with the open-source backends" in capsys.readouterr().err
    assert len(np.load(newest_solve(stats_ready) / "result.npz")["selected"]) == 6


def test_service_down_without_fallback_fails_naming_the_url(stats_ready, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert solve(stats_ready, f"qpm.solver.url={url}", "qpm.solver.fallback_local=false",
                 "qpm.solver.time_limit=34") == 69  # EX_UNAVAILABLE, one line, no traceback
    assert f"qpm-dist: error: the solver service failed: could not reach the solver service at {url}" in \
        capsys.readouterr().err


def test_blocked_service_falls_back_after_the_total_wait(stats_ready, capsys):
    from fake_solver_service import silent_service

    with silent_service() as url:  # accepts connections, never answers
        assert solve(stats_ready, f"qpm.solver.url={url}", "qpm.solver.wait_timeout=1",
                     "qpm.solver.time_limit=35") == 0
    err = capsys.readouterr().err
    assert f"gave up on the solver service at {url} after the total wait of 1 s" in err
    assert "solving in process with the open-source backends" in err
    assert len(np.load(newest_solve(stats_ready) / "result.npz")["selected"]) == 6


def test_blocked_service_without_fallback_stops_with_a_clear_error(stats_ready, capsys):
    from fake_solver_service import silent_service

    with silent_service() as url:
        assert solve(stats_ready, f"qpm.solver.url={url}", "qpm.solver.wait_timeout=1",
                     "qpm.solver.fallback_local=false", "qpm.solver.time_limit=36") == 69
    err = capsys.readouterr().err
    assert "set it to true to solve in process instead" in err
    assert f"qpm-dist: error: the solver service failed: gave up on the solver service at {url} after the total " \
           "wait" in err and "Traceback" not in err
