"""The sbatch scripts in slurm/, run by bash against stand-in `sbatch`, `srun` and `scontrol` executables
(tests/fake_slurm, first on PATH) that record every call: which commands a script would run, with which
arguments, and when it requeues (exit status 75 only, at most MAX_REQUEUES times, also after SIGUSR1)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, clean_env

SLURM = REPO / "slurm"
FAKE = REPO / "tests" / "fake_slurm"
SCRIPTS = ["train_multinode.sbatch", "sweep_array.sbatch", "solver_service.sbatch", "requeue.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


class FakeSlurm:
    def __init__(self, tmp_path: Path) -> None:
        self.log = tmp_path / "slurm-calls.jsonl"
        self.env = {**clean_env(), "PATH": f"{FAKE}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
                                           f"{os.environ['PATH']}",
                    "FAKE_SLURM_LOG": str(self.log), "PYTHON": sys.executable}
        for key in [k for k in self.env if k.startswith("SLURM_")]:
            del self.env[key]

    def sbatch(self, *args: str, background: bool = False, **env: str):
        cmd = ["sbatch", *args]
        full_env = {**self.env, **env}
        if background:
            return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=120)

    def calls(self, cmd: str | None = None) -> list[dict]:
        if not self.log.exists():
            return []
        entries = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [e for e in entries if cmd is None or e["cmd"] == cmd]

    def wait_ready(self, proc: subprocess.Popen, timeout: float = 60) -> None:
        ready = Path(f"{self.log}.ready")
        deadline = time.time() + timeout
        while not ready.exists():
            assert proc.poll() is None, f"batch script ended early: {proc.communicate()}"
            assert time.time() < deadline, "the job step never started"
            time.sleep(0.01)


@pytest.fixture
def slurm(tmp_path) -> FakeSlurm:
    return FakeSlurm(tmp_path)


def after(argv: list[str], marker: list[str]) -> list[str]:
    """The part of `argv` after the sub-sequence `marker`."""
    for i in range(len(argv) - len(marker) + 1):
        if argv[i:i + len(marker)] == marker:
            return argv[i + len(marker):]
    raise AssertionError(f"{marker} not in {argv}")


def torchrun_command(srun_argv: list[str]) -> list[str]:
    """Run the `qpm-dist launch --run ...` an srun call would start, without --run: the torchrun command it
    would execute on a node."""
    launch = after(srun_argv, ["-m", "qpm_dist", "launch"])
    assert launch[0] == "--run"
    proc = subprocess.run([sys.executable, "-m", "qpm_dist", "launch", *launch[1:]], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


# ------------------------------------------------------------------------------------------ train_multinode


def test_multinode_runs_one_torchrun_per_node_with_a_rendezvous_on_the_first_node(slurm):
    proc = slurm.sbatch("--nodes=3", "slurm/train_multinode.sbatch", "configs/demo.yaml", "--stage", "dense",
                        "dense.epochs=3", FAKE_NODELIST="gpu[07-09]", FAKE_JOB_ID="5150")
    assert proc.returncode == 0, proc.stderr
    (sbatch,) = slurm.calls("sbatch")
    directives = sbatch["options"]
    assert directives["signal"] == "B:USR1@90" and directives["requeue"] == "true"
    assert directives["ntasks-per-node"] == "1" and directives["open-mode"] == "append"
    (srun,) = slurm.calls("srun")
    argv = srun["argv"]
    # one task per node, and no kill of the other nodes as soon as one ends (see the script)
    assert argv[:4] == ["--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=0", "--wait=120"]
    assert srun["env"]["SRUN_CPUS_PER_TASK"] == "64"  # the #SBATCH --cpus-per-task, passed on to srun
    assert argv[4:8] == [sys.executable, "-m", "qpm_dist", "launch"]
    torchrun = torchrun_command(argv)
    assert torchrun[0] == "torchrun"
    option = lambda name: torchrun[torchrun.index(name) + 1]  # noqa: E731
    assert option("--nnodes") == "3" and option("--nproc-per-node") == "8"  # #SBATCH --gpus-per-node=8
    assert option("--rdzv-backend") == "c10d" and option("--rdzv-endpoint") == "gpu07:15150"  # from the job id
    assert option("--rdzv-id") == "5150" and option("--shutdown-timeout") == "60"
    assert "SIGUSR1" in option("--signals-to-handle")
    assert torchrun[-5:] == ["run", "configs/demo.yaml", "--stage", "dense", "dense.epochs=3"]
    assert not slurm.calls("scontrol") or all(c["argv"][0] == "show" for c in slurm.calls("scontrol"))


def rendezvous_endpoint(slurm: FakeSlurm, **env: str) -> str:
    proc = slurm.sbatch("--nodes=2", "slurm/train_multinode.sbatch", "configs/demo.yaml", FAKE_NODELIST="gpu[01-02]",
                        **env)
    assert proc.returncode == 0, proc.stderr
    argv = slurm.calls("srun")[-1]["argv"]
    return argv[argv.index("--rdzv-endpoint") + 1]


def test_rendezvous_port_comes_from_the_job_id_unless_the_user_sets_one(slurm):
    """Two multi-node jobs whose first node is the same must not meet in one rendezvous: with a fixed port the
    second job's torchrun joined the first job's and failed when that one ended."""
    first = rendezvous_endpoint(slurm, FAKE_JOB_ID="4711")
    second = rendezvous_endpoint(slurm, FAKE_JOB_ID="4712")
    assert first == "gpu01:14711" and second == "gpu01:14712"
    assert rendezvous_endpoint(slurm, FAKE_JOB_ID="123456") == "gpu01:13456"  # 10000 + job id % 10000
    assert rendezvous_endpoint(slurm, FAKE_JOB_ID="4711", RDZV_PORT="29555") == "gpu01:29555"  # the user's wins


@pytest.mark.parametrize(
    "step_status, env, requeued, batch_status, message",
    [
        (75, {}, True, 0, "requeueing job 1000 (1 of at most 20)"),
        (75, {"SLURM_RESTART_COUNT": "2", "MAX_REQUEUES": "3"}, True, 0, "(3 of at most 3)"),
        (75, {"SLURM_RESTART_COUNT": "3", "MAX_REQUEUES": "3"}, False, 75, "requeued 3 times already"),
        (75, {"FAKE_SCONTROL_REQUEUE_EXIT": "1"}, True, 75, "scontrol requeue failed"),
        (0, {}, False, 0, "job step ended with exit status 0"),
        (1, {}, False, 1, "job step ended with exit status 1"),
        (2, {}, False, 2, "job step ended with exit status 2"),
    ],
)
def test_requeue_on_exit_75_only_and_at_most_max_requeues_times(slurm, step_status, env, requeued, batch_status,
                                                                  message):
    proc = slurm.sbatch("slurm/train_multinode.sbatch", "configs/demo.yaml", FAKE_SRUN=f"exit:{step_status}", **env)
    assert proc.returncode == batch_status, proc.stderr
    assert message in proc.stderr
    requeues = [c["argv"] for c in slurm.calls("scontrol") if c["argv"][0] == "requeue"]
    assert requeues == ([["requeue", "1000"]] if requeued else [])


def test_a_requeue_after_exit_75_does_not_promise_a_checkpoint(slurm):
    """75 also ends a stage that saved nothing (statistics, evaluation, a report): the log says both cases."""
    proc = slurm.sbatch("slurm/train_multinode.sbatch", "configs/demo.yaml", FAKE_SRUN="exit:75")
    assert proc.returncode == 0, proc.stderr
    assert "stopped at a checkpoint" not in proc.stderr
    assert ("job step stopped by a stop signal (exit 75: a training stage saved a checkpoint, any other "
            "unfinished stage restarts;") in proc.stderr
    limit = slurm.sbatch("slurm/train_multinode.sbatch", "configs/demo.yaml", FAKE_SRUN="exit:75",
                         SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    assert limit.returncode == 75 and "stopped at a checkpoint" not in limit.stderr
    assert "stopped by a stop signal (exit 75), but this job was requeued 3 times already" in limit.stderr


def test_sigusr1_to_the_batch_shell_reaches_the_job_step_and_requeues(slurm):
    """SLURM's `--signal=B:USR1@90` signals only the batch shell: it must forward the signal to srun, wait for
    the step to checkpoint and exit 75, then requeue."""
    batch = slurm.sbatch("slurm/train_multinode.sbatch", "configs/demo.yaml", background=True,
                         FAKE_SRUN="until-usr1:75")
    slurm.wait_ready(batch)
    assert not slurm.calls("srun-signal")
    os.kill(batch.pid, signal.SIGUSR1)  # the fake sbatch exec'ed the script: this pid is the batch shell
    stdout, stderr = batch.communicate(timeout=60)
    assert batch.returncode == 0, stderr
    assert [c["signal"] for c in slurm.calls("srun-signal")] == ["SIGUSR1"]
    assert "SIGUSR1 received, asking the job step to checkpoint and stop" in stderr
    assert [c["argv"] for c in slurm.calls("scontrol") if c["argv"][0] == "requeue"] == [["requeue", "1000"]]


# ------------------------------------------------------------------------------------------ sweep_array

SWEEP = """\
# seeds x learning rates
run.seed=0 dense.optim.lr=0.1

run.seed=1 dense.optim.lr=0.1
   # an indented comment
run.seed=0   dense.optim.lr=0.01
"""


def test_array_task_i_trains_run_line_i_of_the_sweep_file(slurm, tmp_path):
    sweep = tmp_path / "lr_sweep.txt"
    sweep.write_text(SWEEP)
    proc = slurm.sbatch("--array=0-2", "slurm/sweep_array.sbatch", str(sweep), "configs/demo.yaml",
                        "dense.epochs=2", FAKE_JOB_ID="700")
    assert proc.returncode == 0, proc.stderr
    runs = slurm.calls("srun")
    assert len(runs) == 3
    expected = [["run.seed=0", "dense.optim.lr=0.1"], ["run.seed=1", "dense.optim.lr=0.1"],
                ["run.seed=0", "dense.optim.lr=0.01"]]
    for task, (srun, overrides) in enumerate(zip(runs, expected)):
        assert srun["env"]["SLURM_ARRAY_TASK_ID"] == str(task)
        assert srun["argv"][0] == "--ntasks=1" and srun["env"]["SRUN_CPUS_PER_TASK"] == "32"
        tail = after(srun["argv"], ["configs/demo.yaml"])
        assert tail == ["run.name=lr_sweep", "dense.epochs=2", *overrides]  # one shared run folder
    torchrun = torchrun_command(runs[2]["argv"])
    assert torchrun[0] == "torchrun" and "--standalone" in torchrun  # one node: a private local rendezvous
    assert torchrun[torchrun.index("--nproc-per-node") + 1] == "4"  # #SBATCH --gpus-per-node=4
    assert torchrun[-6:] == ["run", "configs/demo.yaml", "run.name=lr_sweep", "dense.epochs=2",
                             "run.seed=0", "dense.optim.lr=0.01"]


def test_array_task_requeues_itself_only(slurm, tmp_path):
    """`scontrol requeue <id>` with the id of the task that kept the array's own job id (real SLURM gives it
    to the last task to start; the fake to the last of the list) means the whole array: running tasks are killed and finished ones
    rerun. Every task must requeue ARRAYID_TASKID, i.e. itself only."""
    sweep = tmp_path / "s.txt"
    sweep.write_text(SWEEP)
    proc = slurm.sbatch("--array=0-2", "slurm/sweep_array.sbatch", str(sweep), "configs/demo.yaml",
                        FAKE_JOB_ID="700", FAKE_SRUN="exit:75")
    assert proc.returncode == 0, proc.stderr
    job_ids = [c["env"]["SLURM_JOB_ID"] for c in slurm.calls("srun")]
    assert job_ids == ["701", "702", "700"]  # task 2 has the array's id
    requeues = [c["argv"] for c in slurm.calls("scontrol") if c["argv"][0] == "requeue"]
    assert requeues == [["requeue", "700_0"], ["requeue", "700_1"], ["requeue", "700_2"]]
    assert "requeueing array task 700_2 (job 700)" in proc.stderr


def test_sweep_errors_name_the_file_and_the_number_of_runs(slurm, tmp_path):
    sweep = tmp_path / "s.txt"
    sweep.write_text(SWEEP)
    proc = slurm.sbatch("--array=3", "slurm/sweep_array.sbatch", str(sweep), "configs/demo.yaml")
    assert proc.returncode == 2
    assert f"array task 3, but {sweep} has 3 runs (submit with --array=0-2)" in proc.stderr
    missing = slurm.sbatch("--array=0", "slurm/sweep_array.sbatch", str(tmp_path / "nope.txt"), "configs/demo.yaml")
    assert missing.returncode == 2 and "sweep file not found" in missing.stderr
    not_array = slurm.sbatch("slurm/sweep_array.sbatch", str(sweep), "configs/demo.yaml")
    assert not_array.returncode != 0 and "not an array task" in not_array.stderr
    assert not slurm.calls("srun")


def test_example_sweep_file_has_one_line_per_combination():
    lines = [line.split() for line in (SLURM / "sweeps" / "qpm_seeds_features.txt").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    combos = {tuple(sorted(words)) for words in lines}
    assert len(lines) == len(combos) == 2 * 3 * 2
    assert all({w.split("=")[0] for w in words} == {"run.seed", "qpm.n_features", "qpm.n_per_class"}
               for words in lines)


# ------------------------------------------------------------------------------------------ solver_service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_solver_service_publishes_its_url_when_ready_and_removes_it_when_stopped(slurm, tmp_path):
    url_file = tmp_path / "shared" / "solver.url"
    port = free_port()
    batch = slurm.sbatch("slurm/solver_service.sbatch", str(url_file), background=True, FAKE_SRUN="serve",
                         SOLVER_HOST="127.0.0.1", SOLVER_BIND="127.0.0.1", SOLVER_PORT=str(port),
                         SOLVER_WORKDIR=str(tmp_path / "work"))
    deadline = time.time() + 60
    while not url_file.exists():
        assert batch.poll() is None, batch.communicate()
        assert time.time() < deadline, "the URL file never appeared"
        time.sleep(0.02)
    assert url_file.read_text() == f"http://127.0.0.1:{port}\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # the URL works as soon as the file exists
    (srun,) = slurm.calls("srun")
    argv = srun["argv"]
    assert argv[:5] == ["--ntasks=1", sys.executable, "-m", "solver_service", "serve"]
    token_file = Path(f"{url_file}.token")
    token = token_file.read_text().strip()
    assert len(token) >= 32 and (token_file.stat().st_mode & 0o777) == 0o600  # readable by the owner only
    assert argv[5:] == ["--host", "127.0.0.1", "--port", str(port), "--workdir", str(tmp_path / "work")]
    assert token not in " ".join(argv) and srun["env"]["SOLVER_SERVICE_TOKEN"] == token  # not visible in `ps`
    assert token not in url_file.read_text()

    batch.send_signal(signal.SIGTERM)  # scancel / the time limit
    stdout, stderr = batch.communicate(timeout=60)
    assert batch.returncode == 143, stderr
    assert not url_file.exists() and not token_file.exists()  # nobody will use the dead URL
    assert "removed" in stderr


def test_solver_service_that_fails_to_start_publishes_nothing(slurm, tmp_path):
    url_file = tmp_path / "solver.url"
    proc = slurm.sbatch("slurm/solver_service.sbatch", str(url_file), FAKE_SRUN="exit:3", SOLVER_HOST="127.0.0.1",
                        SOLVER_PORT=str(free_port()), SOLVER_WORKDIR=str(tmp_path / "work"))
    assert proc.returncode == 3
    assert "the service exited (status 3) before accepting connections" in proc.stderr
    assert not url_file.exists() and not Path(f"{url_file}.token").exists()
