"""The sbatch scripts of slurm/ on a real SLURM (tests/real_slurm.py: munged, slurmctld and two slurmd on this
machine, installed with apt when missing), for what the stand-ins of tests/test_slurm.py cannot show.
Skipped, with the reason, when SLURM cannot be installed or started here. Slow (marked): a few minutes.

* a 2-node `train_multinode.sbatch` run completes (CPU, gloo, one process per node);
* `scancel --signal=USR1 --batch` stops it at a checkpoint (exit 75), the job requeues itself, resumes from
  that checkpoint and ends bitwise equal to the uninterrupted run;
* in a `sweep_array.sbatch` array, preempting the task that holds the array's own job id requeues that task
  only: the others are neither killed nor rerun (issue 18 item 1); and all tasks share one dense stage;
* two 2-node jobs on the same nodes at the same time both complete: each has its own rendezvous port (item 2).

Jobs run tiny configs (tests/helpers.py) from this checkout. A job that is to be stopped trains a few hundred
steps (seconds), so that the signal, which passes through slurmctld, slurmd, the batch shell, srun and
torchrun, arrives mid-stage.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (LONG, REPO, assert_same_weights, clean_env, load_weights, newest_logged_step, stage_dir,
                     write_test_config)
from real_slurm import Cluster, Unavailable, start_cluster

pytestmark = pytest.mark.slow

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
# The dense stage of the jobs that are stopped: 320 steps (some seconds) instead of LONG's 48.
DENSE_320_STEPS = {"epochs": 20, "batch_size": 8, "eval_every_epochs": 20}
DENSE_960_STEPS = {"epochs": 60, "batch_size": 8, "eval_every_epochs": 60}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Cluster:
    try:
        running = start_cluster(tmp_path_factory.mktemp("slurm"))
    except Unavailable as reason:
        pytest.skip(f"no real SLURM on this machine: {reason}")
    yield running
    running.stop()


def job_env(cluster: Cluster) -> dict[str, str]:
    """What sbatch passes on to the job (it exports the submitting environment): this checkout's python and
    packages, one thread per rank."""
    env = {k: v for k, v in clean_env().items() if not k.startswith("SLURM_")}
    return {**env, "SLURM_CONF": str(cluster.conf), "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}


def sbatch(cluster: Cluster, *args: str) -> str:
    """Submit from the repository root (the scripts run there); returns the job id. Each job asks for one CPU
    per node, so two jobs fit on a node."""
    cmd = ["sbatch", "--parsable", "--cpus-per-task=1", "--gpus-per-node=1", "--time=15", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(cluster), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def wait_finished(cluster: Cluster, job: str, log: Path, timeout: float = 600) -> dict[str, str]:
    """Wait until `job` (an id or ARRAYID_TASKID) has ended for good (a requeued job passes through PENDING
    again); returns its `scontrol show job` record."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        record = cluster.job(job)
        if record["JobState"] in FINISHED:
            return record
        time.sleep(1)
    raise AssertionError(f"job {job} still {record['JobState']} after {timeout} s; log:\n{read(log)[-4000:]}")


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} does not exist)"


def dense_config(tmp_path: Path, name: str, data: Path, dense: dict = LONG["dense"]) -> tuple[Path, Path]:
    """A config whose dense stage runs `dense` (2 ranks here: one per node); returns (config, out_dir)."""
    out_dir = tmp_path / f"runs-{name}"
    return write_test_config(tmp_path / f"{name}.yaml", data, out_dir, dense=dense), out_dir


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory, tiny_data) -> Path:
    """A 2-node train_multinode.sbatch run of the dense stage; returns its stage folder (the reference)."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    config, out_dir = dense_config(tmp_path, "whole", tiny_data, DENSE_320_STEPS)
    log = tmp_path / "job.out"
    job = sbatch(cluster, "--nodes=2", f"--output={log}", "slurm/train_multinode.sbatch", str(config),
                 "--stage", "dense")
    record = wait_finished(cluster, job, log)
    text = read(log)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", text[-4000:]
    assert "2 nodes x 1 GPUs" in text and ": 2 ranks (gloo)" in text  # one launcher and one worker per node
    assert record["Restarts"] == "0"
    run = stage_dir(out_dir)
    assert json.loads((run / "result.json").read_text())["global_step"] == 320
    return run


def test_two_node_job_completes(uninterrupted):
    assert (uninterrupted / "model.pt").exists()


def test_usr1_stops_requeues_and_resumes_bitwise_equal(cluster, tmp_path, tiny_data, uninterrupted):
    config, out_dir = dense_config(tmp_path, "preempted", tiny_data, DENSE_320_STEPS)
    log = tmp_path / "job.out"
    job = sbatch(cluster, "--nodes=2", f"--output={log}", "slurm/train_multinode.sbatch", str(config),
                 "--stage", "dense")
    wait_for(lambda: newest_logged_step(out_dir) >= 10 or cluster.job(job)["JobState"] in FINISHED, "step 10")
    cluster.run("scancel", "--signal=USR1", "--batch", job)  # what preemption / the time limit sends (B:USR1)
    record = wait_finished(cluster, job, log)
    text = read(log)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", text[-4000:]
    assert record["Restarts"] == "1", text[-4000:]
    assert "SIGUSR1 received, asking the job step to checkpoint and stop" in text
    assert f"requeueing job {job} (1 of at most 20)" in text
    saved = re.findall(r"stop requested: saved (\S+) at epoch", text)
    resumed = re.findall(r"resumed dense from (\S+) \(", text)
    assert len(set(saved)) == 1 and set(resumed) == set(saved), text[-4000:]  # resumed where it stopped
    assert int(re.search(r"step_(\d+)", saved[0]).group(1)) < 320, "the run had finished before the signal"
    assert_same_weights(load_weights(uninterrupted / "model.pt"), load_weights(stage_dir(out_dir) / "model.pt"))


# ------------------------------------------------------------------------------------------ array sweep

# Three runs that differ only after the dense stage, so they can share it. The last one fine-tunes for 480
# steps (seconds), so that it is still training when it is stopped.
SWEEP = """\
qpm.n_per_class=1
qpm.n_per_class=2
qpm.n_per_class=3 finetune.epochs=30
"""


@pytest.fixture(scope="module")
def sweep(cluster, tmp_path_factory, tiny_data) -> dict:
    """`--array=0-2%2`: tasks 0 and 1 run, task 2 starts when one of them has ended and keeps the array's own
    job id (SLURM gives it to the last task to start). USR1 to task 2 while it runs: it must requeue itself,
    not the array. Returns the tasks' records, logs and the out_dir."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    out_dir = tmp_path / "runs"
    config = write_test_config(tmp_path / "sweep.yaml", tiny_data, out_dir, dense={"epochs": 1, "batch_size": 8},
                               finetune={"epochs": 1, "batch_size": 8, "eval_batch_size": 32})
    sweep_file = tmp_path / "tiny_sweep.txt"
    sweep_file.write_text(SWEEP)
    array = sbatch(cluster, "--array=0-2%2", f"--output={tmp_path}/task-%a.out", "slurm/sweep_array.sbatch",
                   str(sweep_file), str(config))
    logs = {task: tmp_path / f"task-{task}.out" for task in range(3)}

    def task2_fine_tuning() -> bool:
        """Task 2 is the one fine-tuning beyond step 16 (an epoch: the others stop there)."""
        task2 = {r.get("ArrayTaskId"): r for r in cluster.jobs(array)}.get("2", {})
        return task2.get("JobState") in FINISHED or newest_logged_step(out_dir, "qpm_finetune") >= 20

    wait_for(task2_fine_tuning, "array task 2 fine-tuning", timeout=600)
    record = {r["ArrayTaskId"]: r for r in cluster.jobs(array)}["2"]
    assert record["JobState"] == "RUNNING", "array task 2 ended before it was stopped: " + read(logs[2])[-3000:]
    assert record["JobId"] == array, "SLURM gave task 2 (the last to start) a job id of its own: " + str(record)
    cluster.run("scancel", "--signal=USR1", "--batch", f"{array}_2")
    records = {task: wait_finished(cluster, f"{array}_{task}", logs[task]) for task in range(3)}
    return {"array": array, "records": records, "logs": {t: read(p) for t, p in logs.items()}, "out_dir": out_dir}


def test_preempting_one_array_task_requeues_that_task_only(sweep):
    records, logs, array = sweep["records"], sweep["logs"], sweep["array"]
    for task in (0, 1):  # neither killed while running nor run again after they had finished
        assert "DUE TO JOB REQUEUE" not in logs[task], logs[task][-4000:]
        assert logs[task].count("batch script: array task") == 1, logs[task][-4000:]
        assert records[task]["Restarts"] == "0", logs[task][-4000:]
    for task, record in records.items():
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", logs[task][-4000:]
    assert records[2]["Restarts"] == "1", logs[2][-4000:]
    assert f"requeueing array task {array}_2 (job {array})" in logs[2], logs[2][-4000:]


def test_array_tasks_share_one_dense_stage(sweep):
    """The sweep script's shared run.name and the stage lock: one task trains the dense stage while the others
    wait, then reuse it (before: every task trained an identical dense model of its own)."""
    dense = sorted(sweep["out_dir"].glob("*/dense-*"))
    assert len(dense) == 1, f"each task trained its own dense model: {dense}"
    lines = (dense[0] / "metrics.jsonl").read_text().splitlines()
    steps = [r["global_step"] for r in map(json.loads, filter(str.strip, lines)) if r.get("event") == "step"]
    assert steps == list(range(1, 17)), f"the dense stage was trained more than once: steps {steps}"


# ------------------------------------------------------------------------------------------ two jobs, one node


def test_two_multinode_jobs_on_the_same_first_node_both_complete(cluster, tmp_path, tiny_data):
    """Both jobs get both nodes (one CPU each of two). With one fixed rendezvous port the second job's torchrun
    joined the first job's c10d store (the port was taken, so it connected as a client) and failed with
    RendezvousConnectionError when the first job ended: the second job here trains long enough (960 steps)
    to outlive the first by more than the first's shutdown (about 12 s)."""
    jobs = []
    for name, dense in (("short", LONG["dense"]), ("long", DENSE_960_STEPS)):
        config, _ = dense_config(tmp_path, name, tiny_data, dense)
        log = tmp_path / f"{name}.out"
        jobs.append((sbatch(cluster, "--nodes=2", f"--output={log}", "slurm/train_multinode.sbatch", str(config),
                            "--stage", "dense"), log))
    wait_for(lambda: all(cluster.job(job)["JobState"] != "PENDING" for job, _ in jobs), "both jobs to start")
    records = [cluster.job(job) for job, _ in jobs]
    assert [r["JobState"] for r in records] == ["RUNNING", "RUNNING"], "the jobs did not run at the same time"
    assert records[0]["NodeList"] == records[1]["NodeList"], "the jobs run on different nodes"
    ports = set()
    for job, log in jobs:
        record = wait_finished(cluster, job, log)
        text = read(log)
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", text[-4000:]
        ports.add(re.search(r"rendezvous (\S+)", text).group(1))
    assert len(ports) == 2, ports
