"""`qpm-dist launch`: the torchrun / deepspeed command lines it prints for one node, several nodes and elastic
runs, and the bad input it refuses (exit 2). Nothing is started here; tests/test_multinode.py runs them."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys

import pytest

from helpers import REPO, clean_env
from qpm_dist.launching import SIGNALS_TO_HANDLE, main

CONFIG = str(REPO / "configs" / "demo.yaml")


def launch(capsys, *args: str) -> list[str]:
    assert main(list(args)) == 0, capsys.readouterr().err
    return shlex.split(capsys.readouterr().out)


def option(cmd: list[str], name: str) -> str:
    assert cmd.count(name) == 1, f"{name} given {cmd.count(name)} times in {cmd}"
    return cmd[cmd.index(name) + 1]


def test_one_node_uses_a_standalone_rendezvous_and_passes_run_arguments(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # outside the repository the script is named by its absolute path
    cmd = launch(capsys, "--nproc-per-node", "2", CONFIG, "--stage", "dense", "dense.epochs=1")
    assert cmd[0] == "torchrun" and "--standalone" in cmd
    assert option(cmd, "--nnodes") == "1" and option(cmd, "--nproc-per-node") == "2"
    assert "--rdzv-endpoint" not in cmd and "--max-restarts" not in cmd
    script = cmd.index(str(REPO / "launch" / "train.py"))
    assert cmd[script + 1:] == ["run", CONFIG, "--stage", "dense", "dense.epochs=1"]
    # SIGUSR1 must be handled (forwarded), or SLURM's warning signal kills torchrun and orphans the workers
    assert option(cmd, "--signals-to-handle") == SIGNALS_TO_HANDLE and "SIGUSR1" in SIGNALS_TO_HANDLE
    assert option(cmd, "--shutdown-timeout") == "60"


def test_several_nodes_use_c10d_with_one_id_and_no_node_rank(capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cmd = launch(capsys, "--nnodes", "4", "--nproc-per-node", "8", "--rdzv-endpoint", "gpu017:29400",
                 "--shutdown-timeout", "45", CONFIG)
    assert "--standalone" not in cmd and "--node-rank" not in cmd  # c10d assigns the node ranks
    assert option(cmd, "--nnodes") == "4" and option(cmd, "--nproc-per-node") == "8"
    assert option(cmd, "--rdzv-backend") == "c10d" and option(cmd, "--rdzv-endpoint") == "gpu017:29400"
    assert option(cmd, "--rdzv-id") == "4242"  # the SLURM job: identical on every node of the allocation
    assert option(cmd, "--shutdown-timeout") == "45"


def test_elastic_run_with_a_node_range_and_restarts(capsys):
    cmd = launch(capsys, "--nnodes", "2:4", "--max-restarts", "3", "--nproc-per-node", "4", "--rdzv-endpoint",
                 "head:29400", "--rdzv-id", "sweep7", CONFIG)
    assert option(cmd, "--nnodes") == "2:4" and option(cmd, "--max-restarts") == "3"
    assert option(cmd, "--rdzv-id") == "sweep7"
    # a restart must start from a fresh key-value store (tests/test_multinode.py shows why)
    assert cmd[:2] == ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", "torchrun"]
    one_node = launch(capsys, "--max-restarts", "1", "--nproc-per-node", "2", CONFIG)
    assert one_node[:2] == ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", "torchrun"] and "--standalone" in one_node
    node_range = launch(capsys, "--nnodes", "1:2", "--rdzv-endpoint", "head:29400", "--nproc-per-node", "2", CONFIG)
    assert node_range[0] == "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"  # a joining node restarts the group, too


def test_static_rendezvous_with_fixed_node_ranks(capsys):
    cmd = launch(capsys, "--nnodes", "2", "--rdzv-backend", "static", "--node-rank", "1", "--nproc-per-node", "1",
                 "--rdzv-endpoint", "10.0.0.5:29500", CONFIG)
    assert option(cmd, "--rdzv-backend") == "static" and option(cmd, "--node-rank") == "1"
    assert option(cmd, "--master-addr") == "10.0.0.5" and option(cmd, "--master-port") == "29500"


def test_deepspeed_launcher_one_node_and_one_command_per_node(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    one = launch(capsys, "--launcher", "deepspeed", "--nproc-per-node", "2", CONFIG, "engine.strategy=deepspeed")
    assert one[:3] == ["deepspeed", "--num_gpus", "2"]
    assert one[3:] == [str(REPO / "launch" / "train.py"), "run", CONFIG, "engine.strategy=deepspeed"]
    port = launch(capsys, "--launcher", "deepspeed", "--nproc-per-node", "2", "--rdzv-endpoint", "127.0.0.1:29611",
                  CONFIG)
    assert option(port, "--master_addr") == "127.0.0.1" and option(port, "--master_port") == "29611"
    many = launch(capsys, "--launcher", "deepspeed", "--nnodes", "2", "--node-rank", "1", "--hostfile", "/job/hosts",
                  "--rdzv-endpoint", "n1:29500", "--nproc-per-node", "4", CONFIG)
    assert "--no_ssh" in many and option(many, "--node_rank") == "1" and option(many, "--num_nodes") == "2"
    assert option(many, "--hostfile") == "/job/hosts" and option(many, "--master_addr") == "n1"
    assert option(many, "--master_port") == "29500" and option(many, "--num_gpus") == "4"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nnodes", "2"], "several nodes need --rdzv-endpoint HOST:PORT"),
        (["--nnodes", "2", "--rdzv-endpoint", "head"], "--rdzv-endpoint: expected HOST:PORT, got 'head'"),
        (["--nnodes", "0"], "--nnodes: expected 1 <= MIN <= MAX"),
        (["--nnodes", "two"], "--nnodes: expected N or MIN:MAX"),
        (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--node-rank", "0"],
         "--node-rank applies to --rdzv-backend static"),
        (["--nnodes", "2", "--rdzv-backend", "static", "--rdzv-endpoint", "h:1", "--node-rank", "0",
          "--max-restarts", "1"], "--max-restarts needs --rdzv-backend c10d"),
        (["--nnodes", "2", "--rdzv-backend", "static", "--rdzv-endpoint", "h:1", "--node-rank", "2"],
         "--node-rank: expected 0..1, got 2"),
        (["--launcher", "deepspeed", "--max-restarts", "1"], "the deepspeed launcher has no elastic restarts"),
        (["--launcher", "deepspeed", "--nnodes", "2", "--rdzv-endpoint", "h:1"], "needs --hostfile"),
        (["--nproc-per-node", "0"], "--nproc-per-node: expected a positive integer"),
        (["--script", "/nonexistent/train.py"], "--script: file not found: /nonexistent/train.py"),
    ],
)
def test_bad_launch_options_exit_2_naming_the_option(capsys, args, message):
    assert main([*args, CONFIG]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_config_is_checked_before_anything_is_printed(capsys):
    assert main(["--nproc-per-node", "1", CONFIG, "dense.optim.lrr=0.1"]) == 2
    assert "unknown config key 'dense.optim.lrr'; did you mean 'dense.optim.lr'?" in capsys.readouterr().err
    assert main(["--nproc-per-node", "1", "/nonexistent/c.yaml"]) == 2
    assert "config file not found: /nonexistent/c.yaml" in capsys.readouterr().err
    assert main(["--nproc-per-node", "1", CONFIG, "--stagee", "dense"]) == 2
    assert "unexpected arguments after the config: --stagee" in capsys.readouterr().err


def test_qpm_dist_launch_from_the_command_line_in_the_repository():
    """As users run it: `qpm-dist launch` (here `python -m qpm_dist launch`) from the repository root."""
    proc = subprocess.run([sys.executable, "-m", "qpm_dist", "launch", "--nproc-per-node", "2", "configs/demo.yaml"],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout)
    assert cmd[0] == "torchrun" and cmd[-3:] == ["launch/train.py", "run", "configs/demo.yaml"]


def _raise(exc: BaseException):
    def torchrun_main(args):
        raise exc
    return torchrun_main


def _workers_failed(*codes: int) -> BaseException:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    failures = {rank: ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="<N/A>")
                for rank, code in enumerate(codes)}
    return ChildFailedError("launch/train.py", failures)


def _torchrun_signalled(sig: signal.Signals) -> BaseException:
    from torch.distributed.elastic.multiprocessing.api import SignalException

    return SignalException(f"Process 1 got signal: {sig}", sigval=sig)


@pytest.mark.parametrize(
    "outcome, status",
    [
        (None, 0),
        (lambda: _workers_failed(75, 75), 75),
        (lambda: _workers_failed(75, -signal.SIGTERM), 75),  # the other rank was still exiting when torchrun stopped it
        (lambda: _workers_failed(-signal.SIGTERM, 75, -signal.SIGKILL), 75),
        (lambda: _workers_failed(1, -signal.SIGTERM), 1),  # a crash
        (lambda: _workers_failed(75, 1), 1),  # one rank crashed: not a clean stop
        (lambda: _workers_failed(-signal.SIGKILL), 1),  # OOM killer or SIGKILL from outside
        (lambda: _workers_failed(2, 2), 2),  # bad input, e.g. a dataset folder missing on that node
        (lambda: _workers_failed(2, -signal.SIGTERM), 2),
        (lambda: _workers_failed(2, 75), 1),
        (lambda: _workers_failed(3, -signal.SIGTERM), 3),  # the run diverged: not requeued, not a crash
        (lambda: _workers_failed(3, 2), 1),
        (lambda: _workers_failed(69), 69),  # the solver service failed and there is no fallback (rank 0 solves)
        (lambda: _workers_failed(-signal.SIGTERM, -signal.SIGTERM), 1),
        (lambda: _torchrun_signalled(signal.SIGUSR1), 75),  # SLURM's warning, forwarded to the workers
        (lambda: _torchrun_signalled(signal.SIGTERM), 75),
        (lambda: _torchrun_signalled(signal.SIGINT), 130),  # Ctrl-C: no checkpoint is promised
    ],
)
def test_launcher_exit_status_keeps_the_engines_75(monkeypatch, outcome, status):
    """torchrun itself exits 1 for every worker failure; `qpm-dist launch --run` must tell the sbatch script
    whether the run stopped at a checkpoint (75) or failed."""
    import torch.distributed.run

    from qpm_dist.launching import run_torchrun

    monkeypatch.setattr(torch.distributed.run, "main", _raise(outcome()) if outcome else lambda args: None)
    assert run_torchrun(["--standalone", "train.py"]) == status


@pytest.mark.parametrize("outcome", [lambda: _workers_failed(75, -signal.SIGTERM),
                                     lambda: _torchrun_signalled(signal.SIGUSR1)])
def test_a_stop_is_logged_with_what_was_saved(monkeypatch, capsys, outcome):
    """Exit 75 also ends a stage that saves no checkpoint (statistics, evaluation, a report): the launcher must
    not promise a checkpoint (issue 18)."""
    import torch.distributed.run

    from qpm_dist.launching import run_torchrun

    monkeypatch.setattr(torch.distributed.run, "main", _raise(outcome()))
    assert run_torchrun(["--standalone", "train.py"]) == 75
    err = capsys.readouterr().err
    assert ("stopped by a stop signal (exit 75): finished stages are kept; a training stage saved a checkpoint and "
            "resumes from it on rerun, any other unfinished stage saved nothing and restarts") in err
    assert "stopped at a checkpoint" not in err
