"""Several nodes on one machine: `qpm-dist launch --run` once per "node" over loopback, as the SLURM script
runs it once per node. Every run here has world size 2 and trains the same config as the single-node
2-process reference, so the final weights must be bitwise equal to it, on every rank.

* two nodes (static rendezvous, --node-rank 0/1) end equal to one node with two processes;
* elastic: a worker SIGKILLed on node 1 is restarted by torchrun (--max-restarts 1) together with node 0's;
  both resume from the newest checkpoint and finish, bitwise equal to the uninterrupted run;
* the launcher's exit status is 75 after a stop signal, whether torchrun or a worker received it, which is
  what the sbatch scripts requeue on;
* (slow) DeepSpeed's launcher starts the same entry point, passes 75 through, and the resumed run ends equal.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from helpers import (LONG, REPO, assert_same_weights, clean_env, load_weights, newest_logged_step, stage_dir,
                     write_test_config)

ENTRY = REPO / "tests" / "rank_weights_entry.py"


def write_config(directory: Path, name: str, data_root: Path, **engine) -> Path:
    return write_test_config(directory / f"{name}.yaml", data_root, directory / f"runs-{name}", dense=LONG["dense"],
                             engine=engine)


def out_dir(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["run"]["out_dir"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """A failed or timed-out test must not leave launchers and workers running."""
    yield
    while _started:
        proc = _started.pop()
        try:
            tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
        except psutil.NoSuchProcess:
            continue
        for p in tree:
            _signal(p, signal.SIGKILL)
        proc.wait()


def start(config: Path, log: Path, *launch_options: str) -> subprocess.Popen:
    """`qpm-dist launch --run ...` for one node, output to `log`."""
    cmd = [sys.executable, "-m", "qpm_dist", "launch", "--run", "--script", str(ENTRY), *launch_options, str(config),
           "--stage", "dense"]
    # torchrun's INFO log (rendezvous, restarts) and Python stacks on SIGABRT: what a failure report needs
    env = {**clean_env(), "LOGLEVEL": "INFO", "PYTHONFAULTHANDLER": "1"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True)
    _started.append(proc)
    return proc


def finish(proc: subprocess.Popen, log: Path, timeout: float = 420) -> str:
    """Wait for a launcher; if it hangs, dump every process's Python stack into its log, then kill them all."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
        for p in tree:
            _signal(p, signal.SIGABRT)
        time.sleep(2)
        for p in tree:
            _signal(p, signal.SIGKILL)
        proc.wait()
    return log.read_text()


def _signal(process: psutil.Process, sig: signal.Signals) -> None:
    try:
        process.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def logged_step(config: Path) -> int:
    return newest_logged_step(out_dir(config))


def published_checkpoints(config: Path) -> list[Path]:
    return [p for p in out_dir(config).glob("*/dense-*/checkpoints/step_*") if not p.name.endswith(".tmp")]


def wait_until(condition, procs: list[subprocess.Popen], what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        for proc in procs:
            assert proc.poll() is None, f"a launcher ended (exit {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def workers(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The training processes started under this launcher: `python [-u] ENTRY ...` (not the launchers, whose
    command lines also name ENTRY)."""
    return [p for p in psutil.Process(launcher.pid).children(recursive=True) if str(ENTRY) in p.cmdline()[1:3]]


def check_weights(config: Path, reference: Path, ranks: int = 2) -> None:
    run = stage_dir(out_dir(config))
    assert_same_weights(load_weights(reference / "model.pt"), load_weights(run / "model.pt"))
    for rank in range(ranks):  # every rank holds exactly the reference's parameters
        assert_same_weights(load_weights(reference / "weights.rank0.pt"), load_weights(run / f"weights.rank{rank}.pt"))


@pytest.fixture(scope="module")
def reference(two_rank_reference) -> Path:
    """The uninterrupted single-node run with 2 processes (shared with tests/test_engine.py)."""
    return two_rank_reference


def test_two_nodes_over_loopback_equal_one_node_with_two_processes(tmp_path, tiny_data, reference):
    config = write_config(tmp_path, "two-nodes", tiny_data)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [start(config, tmp_path / f"node{rank}.log", "--nnodes", "2", "--nproc-per-node", "1",
                   "--rdzv-backend", "static", "--node-rank", str(rank), "--rdzv-endpoint", endpoint)
             for rank in (0, 1)]
    logs = [finish(node, tmp_path / f"node{rank}.log") for rank, node in enumerate(nodes)]
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-3000:]
    assert "run " in logs[0] and ": 2 ranks (gloo)" in logs[0]  # one process per node, one group of two
    check_weights(config, reference)


def test_worker_killed_on_one_node_is_restarted_and_the_run_resumes(tmp_path, tiny_data, reference):
    config = write_config(tmp_path, "elastic", tiny_data, checkpoint_every_steps=2)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [start(config, tmp_path / f"node{rank}.log", "--nnodes", "2", "--nproc-per-node", "1",
                   "--rdzv-endpoint", endpoint, "--rdzv-id", "elastic-test", "--max-restarts", "1")
             for rank in (0, 1)]
    try:
        wait_until(lambda: logged_step(config) >= 5 and published_checkpoints(config), nodes, "step 5 and a checkpoint")
        (victim,) = workers(nodes[1])
        victim.send_signal(signal.SIGKILL)
        killed_at = logged_step(config)
    finally:
        logs = [finish(node, tmp_path / f"node{rank}.log") for rank, node in enumerate(nodes)]
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-4000:]
    assert killed_at < 48, "the run had finished before the worker was killed"
    both = "\n".join(logs)
    assert "will restart worker group" in logs[1]  # torchrun restarted the killed worker's group ...
    assert "resumed dense from" in both, both[-4000:]  # ... and the run resumed from a checkpoint (rank 0 logs it)
    check_weights(config, reference)


def test_launcher_exits_75_after_a_stop_signal_and_the_rerun_finishes(tmp_path, tiny_data, reference):
    """SIGUSR1 to the launcher (torchrun forwards it) and SIGUSR1 to one worker only: both stop at a checkpoint
    with exit status 75 — not torchrun's generic 1 — and running the same command again finishes the run."""
    config = write_config(tmp_path, "usr1", tiny_data)
    options = ("--nproc-per-node", "2")

    first = start(config, tmp_path / "first.log", *options)
    wait_until(lambda: logged_step(config) >= 3, [first], "step 3")
    first.send_signal(signal.SIGUSR1)  # what srun does with the batch script's forwarded USR1
    log = finish(first, tmp_path / "first.log")
    assert first.returncode == 75, log[-3000:]
    assert "torchrun stopped by SIGUSR1" in log

    stopped_at = logged_step(config)
    second = start(config, tmp_path / "second.log", *options)
    wait_until(lambda: logged_step(config) >= stopped_at + 3, [second], "3 more steps")
    workers(second)[-1].send_signal(signal.SIGUSR1)  # one worker only: all ranks stop together
    log = finish(second, tmp_path / "second.log")
    assert second.returncode == 75, log[-3000:]
    # torchrun stops the group when the first worker exits: the others show 75 or, if still exiting, -15
    assert "qpm-dist launch: workers failed with exit codes [" in log and "resumed dense from" in log

    third = start(config, tmp_path / "third.log", *options)
    log = finish(third, tmp_path / "third.log")
    assert third.returncode == 0, log[-3000:]
    check_weights(config, reference)


@pytest.mark.slow
def test_deepspeed_launcher_runs_the_entry_point_stops_with_75_and_resumes(tmp_path, tiny_data, reference):
    """`deepspeed --num_gpus 2 launch/train.py ...` (CPU processes here): the launcher appends --local_rank,
    which the entry point drops; a stop signal to one worker ends the launcher with 75; the rerun finishes
    bitwise equal to the torchrun reference (same world size, same data order)."""
    config = write_config(tmp_path, "deepspeed-launcher", tiny_data)
    options = ("--launcher", "deepspeed", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    first = start(config, tmp_path / "first.log", *options)
    wait_until(lambda: logged_step(config) >= 3, [first], "step 3")
    ranks = workers(first)
    assert len(ranks) == 2 and all("--local_rank=" in " ".join(p.cmdline()) for p in ranks)
    ranks[-1].send_signal(signal.SIGUSR1)
    log = finish(first, tmp_path / "first.log")
    assert first.returncode == 75, log[-3000:]
    options = ("--launcher", "deepspeed", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    second = start(config, tmp_path / "second.log", *options)
    log = finish(second, tmp_path / "second.log")
    assert second.returncode == 0, log[-3000:]
    assert "resumed dense from" in log
    check_weights(config, reference)
