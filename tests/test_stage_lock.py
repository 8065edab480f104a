"""Runs sharing a run folder: one runs a stage, the others wait for it and reuse it (issue 18, item 3).

The lock itself and the runner's waiting in process (fake stages); the race that the lock removes with real
`qpm-dist run` processes on one run folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import REPO, clean_env, qpm_command
from qpm_dist.engine.preemption import Preempted
from qpm_dist.stages.lock import OWNER, StageLock
from qpm_dist.stages.runner import run_stages
from test_runner import Recorder, context


def _fake_owner(lock: Path, host: str, pid: int, heartbeat: float) -> None:
    lock.mkdir()
    (lock / OWNER).write_text(json.dumps({"host": host, "pid": pid, "job": "77_3", "token": "theirs",
                                          "heartbeat": heartbeat}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lock_is_exclusive_and_records_its_owner(tmp_path):
    first, second = StageLock(tmp_path / "s.lock", heartbeat_s=0.05), StageLock(tmp_path / "s.lock")
    assert first.try_acquire()
    try:
        assert not second.try_acquire()
        owner = second.owner()
        assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
        beat = owner["heartbeat"]
        time.sleep(0.3)
        assert second.owner()["heartbeat"] > beat  # the background thread keeps it fresh
    finally:
        first.release()
    assert not (tmp_path / "s.lock").exists()
    assert second.try_acquire()
    second.release()


@pytest.mark.parametrize("owner", ["dead pid on this host", "old heartbeat on another host"])
def test_a_stale_lock_is_broken(tmp_path, owner):
    path = tmp_path / "s.lock"
    if owner == "dead pid on this host":
        _fake_owner(path, socket.gethostname(), _dead_pid(), heartbeat=time.time())
    else:
        _fake_owner(path, "elsewhere", 1, heartbeat=time.time() - 3600)
    lock, late = StageLock(path, stale_s=60), StageLock(path, stale_s=60)
    assert lock.try_acquire()
    assert lock.owner()["token"] == lock.token and not list(tmp_path.glob("s.lock.stale-*"))
    assert not late.try_acquire()  # the lock taken after breaking is live: another waiter does not break it
    lock.release()


def test_a_waiter_that_judged_an_older_lock_stale_gives_back_the_new_one(tmp_path):
    # B looked at a stale lock (token "old"); meanwhile A broke it and took the lock afresh ("theirs"); B's rename
    # now moves A's live lock: B must see the other token, put it back and not take the lock
    path = tmp_path / "s.lock"
    _fake_owner(path, "elsewhere", 1, heartbeat=time.time())
    assert not StageLock(path)._break({"token": "old"}, "judged stale earlier")
    assert json.loads((path / OWNER).read_text())["token"] == "theirs" and len(list(tmp_path.iterdir())) == 1


def test_a_live_lock_on_another_host_is_not_broken(tmp_path):
    path = tmp_path / "s.lock"
    _fake_owner(path, "elsewhere", 1, heartbeat=time.time())
    assert not StageLock(path, stale_s=60).try_acquire()
    assert json.loads((path / OWNER).read_text())["token"] == "theirs"


def test_a_run_waits_for_a_live_lock_then_runs_the_stage(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("QPM_DIST_LOCK_POLL_S", "0.05")
    ctx, stage = context(tmp_path), Recorder("a")
    held = StageLock.of_stage(tmp_path / f"a-{_key(stage, ctx)}")
    assert held.try_acquire()
    released = []
    timer = threading.Timer(0.5, lambda: (released.append(time.time()), held.release()))
    timer.start()
    try:
        with caplog.at_level("INFO", logger="qpm_dist"):
            run_stages([stage], ctx)
    finally:
        timer.cancel()
        held.release()
    assert stage.runs == 1 and released
    waited = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for stage a held by")]
    assert len(waited) == 1 and f"{socket.gethostname()}/pid {os.getpid()}/job" in waited[0]
    assert len(list(tmp_path.glob("a-*"))) == 1 and not list((tmp_path / ".locks").iterdir())


def test_a_run_reuses_what_the_run_it_waited_for_finished(tmp_path, monkeypatch):
    from qpm_dist.engine.preemption import StopRequest
    from qpm_dist.stages.runner import _run_stage, stage_key

    monkeypatch.setenv("QPM_DIST_LOCK_POLL_S", "0.05")
    ctx, first, second = context(tmp_path), Recorder("a"), Recorder("a")
    key = stage_key(first, ctx)
    out_dir = tmp_path / f"a-{key[:12]}"
    held = StageLock.of_stage(out_dir)
    assert held.try_acquire()

    def the_other_run():  # runs the stage under its lock, as another process would
        _run_stage(first, context(tmp_path), key, out_dir, StopRequest())
        held.release()

    other = threading.Timer(0.3, the_other_run)
    other.start()
    records = run_stages([second], ctx)
    other.join()
    assert first.runs == 1 and second.runs == 0 and records["a"]["summary"] == {"runs": 1}


def test_a_stop_signal_while_waiting_ends_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("QPM_DIST_LOCK_POLL_S", "0.05")
    ctx, stage = context(tmp_path), Recorder("a")
    path = StageLock.of_stage(tmp_path / f"a-{_key(stage, ctx)}").path
    path.parent.mkdir()
    _fake_owner(path, "elsewhere", 1, heartbeat=time.time() + 3600)  # live for the whole test
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.start()
    with pytest.raises(Preempted, match="while waiting for stage a held by elsewhere/pid 1/job 77_3"):
        run_stages([stage], ctx)
    timer.cancel()
    assert stage.runs == 0


def _key(stage, ctx) -> str:
    from qpm_dist.stages.runner import stage_key

    return stage_key(stage, ctx)[:12]


def test_concurrent_runs_on_one_run_folder_train_the_dense_stage_once(write_config, tmp_path):
    """Three `qpm-dist run` processes with one run.name (a sweep's tasks of one seed): before the lock each
    trained the same model into the same folder and they broke each other's checkpoint temp folders
    (FileNotFoundError, reported as exit 2)."""
    config = write_config(dense={"epochs": 1})
    env = {**clean_env(), "QPM_DIST_LOCK_POLL_S": "0.2"}
    procs = [subprocess.Popen(qpm_command(1, "run", str(config), "--stage", "dense"), cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(log[-2000:] for log in logs)
    trained = [log for log in logs if "stage dense: running into" in log]
    assert len(trained) == 1, f"{len(trained)} runs trained the dense stage"
    assert sum("finished by another run meanwhile" in log or "finished earlier" in log for log in logs) == 2
    folders = list((tmp_path / "runs-config" / "t").glob("dense-*"))
    assert len(folders) == 1 and not list((tmp_path / "runs-config" / "t" / ".locks").iterdir())  # none left
    steps = [json.loads(x) for x in (folders[0] / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert len([r for r in steps if r.get("event") == "step"]) == 8  # 1 epoch x 8 steps, logged once
    accuracy = {line.split("test top-1")[1].split("%")[0] for log in logs for line in log.splitlines()
                if "stage dense: test top-1" in line}
    assert len(accuracy) == 1  # every run reports the same dense model
