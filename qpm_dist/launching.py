"""`qpm-dist launch`: the launcher command for one node, several nodes or an elastic run — printed, or run.

We do not launch processes ourselves: this module writes the command line of torchrun (or of DeepSpeed's
launcher) that starts `launch/train.py run CONFIG ...` on every node, and prints it. With `--run` it also
executes it on this node, which is what the SLURM scripts do (one `qpm-dist launch --run` per node).

    one node        torchrun --standalone --nnodes 1 --nproc-per-node 4 ... launch/train.py run CONFIG
    several nodes   torchrun --nnodes 4 --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID ...
                    (the same command on every node; the c10d rendezvous assigns the node ranks)
    fixed ranks     --rdzv-backend static --node-rank R (torchrun's --master-addr/--master-port)
    elastic         --nnodes MIN:MAX and/or --max-restarts K: torchrun restarts *all* workers after a
                    failure; `run.resume=auto` (the default) continues from the newest checkpoint.
                    Printed with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in front: by default the workers share
                    the rendezvous' key-value store, which outlives a restart, so the restarted workers can
                    read the previous round's addresses and counters and fail or hang while forming the
                    process group (pytorch/pytorch#135712; seen here with torch 2.14). With it, every round
                    starts with a fresh store.

Every torchrun command also carries
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1  torchrun's defaults plus SIGUSR1, the signal SLURM
                      sends before the time limit: without it a SIGUSR1 kills torchrun (the default action)
                      and orphans the workers; with it torchrun forwards the signal to its workers;
  --shutdown-timeout S  how long torchrun waits for the workers to write their checkpoint after forwarding
                      the signal, before it sends SIGKILL.

Exit status of `--run` with torchrun. torchrun reports any failed worker as exit status 1, which would hide
the engine's 75 ("stopped by a stop signal, run again to continue") from srun and the sbatch script. So we run
torchrun in this process (`torch.distributed.run.main`, the function behind the `torchrun` command) and
return 0 when all workers succeeded; 75 when the workers were stopped by a stop signal (a training stage at a
checkpoint, any other stage with nothing saved: it restarts); 2 when they all stopped on
bad input; 3 when they all stopped on a non-finite loss (the run diverged); 69 when the solver service failed
without a fallback; 128+N when torchrun was stopped by a signal N other than SIGTERM/SIGUSR1; 1 for any other
failure. Workers that torchrun itself killed (SIGTERM, or SIGKILL after --shutdown-timeout) while they were
still exiting do not count: torchrun stops the whole group as soon as the first worker ends. So
"stopped by a stop signal" is:
* a worker exited 75 and every other failed worker exited 75 or was killed by torchrun. A checkpoint (in
  a training stage) is complete by then: a rank leaves the checkpoint's final barrier, and can exit 75, only
  after rank 0 published the checkpoint;
* or torchrun itself received SIGTERM/SIGUSR1: it forwarded the signal, on which every rank checkpoints and
  exits 75, and waited up to --shutdown-timeout (if a save could not finish in time, torchrun logs the
  SIGKILL and the resume uses the previous checkpoint).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from qpm_dist.engine.preemption import PREEMPTED_EXIT_CODE

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3  # training diverged (NaN/inf): rerunning the same command would diverge again
EXIT_UNAVAILABLE = 69  # sysexits' EX_UNAVAILABLE: the solver service failed and qpm.solver.fallback_local=false
REPO = Path(__file__).resolve().parents[1]
# What exit 75 means, for the log: a stop signal reached the workers; what they saved depends on the stage.
STOPPED = ("stopped by a stop signal (exit 75): finished stages are kept; a training stage saved a checkpoint and "
           "resumes from it on rerun, any other unfinished stage saved nothing and restarts; the workers' "
           "\"stopped ...\" lines above say which")
# torchrun's default set plus SIGUSR1 (SLURM's `--signal=USR1@...` and `scancel --signal=USR1`).
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# For runs that can restart (see the module docstring).
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
DEFAULT_SHUTDOWN_TIMEOUT_S = 60


class LaunchError(ValueError):
    """Bad launch options: reported with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qpm-dist launch",
        description="Print (or with --run execute) the torchrun / deepspeed command that starts CONFIG on this "
                    "node. Everything after CONFIG is passed to `qpm-dist run` (--stage, overrides).",
    )
    p.add_argument("--launcher", choices=["torchrun", "deepspeed"], default="torchrun")
    p.add_argument("--nnodes", default="1", help="number of nodes, or MIN:MAX for an elastic run (default 1)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes per node (default: the GPUs of this machine, or 1 without GPUs)")
    p.add_argument("--rdzv-endpoint", help="HOST:PORT reachable from every node (required for several nodes; "
                                           "with the deepspeed launcher on one node: its master address)")
    p.add_argument("--rdzv-id", default=None,
                   help="id shared by all nodes of one run (default: $SLURM_JOB_ID, else qpm-dist)")
    p.add_argument("--rdzv-backend", choices=["c10d", "static"], default="c10d",
                   help="c10d (default): nodes join in any order, elastic restarts possible; static: fixed "
                        "--node-rank per node")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this node's rank (only with --rdzv-backend static, or with the deepspeed launcher)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="torchrun restarts all workers up to K times after a failure (elastic; default 0)")
    p.add_argument("--shutdown-timeout", type=int, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                   help="seconds workers get to checkpoint after a stop signal before SIGKILL "
                        f"(default {DEFAULT_SHUTDOWN_TIMEOUT_S})")
    p.add_argument("--hostfile", help="deepspeed launcher with several nodes: the MPI-style hostfile")
    p.add_argument("--script", default=None, help="the entry point to start (default: launch/train.py)")
    p.add_argument("--run", action="store_true", help="execute the command on this node instead of printing it")
    p.add_argument("config", help="YAML config file")
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="passed to `qpm-dist run`: --stage S, overrides")
    return p


def _parse_nnodes(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition(":")
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise LaunchError(f"--nnodes: expected N or MIN:MAX, got {text!r}") from None
    if not 1 <= low <= high:
        raise LaunchError(f"--nnodes: expected 1 <= MIN <= MAX, got {text!r}")
    return low, high


def _split_endpoint(endpoint: str) -> tuple[str, str]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise LaunchError(f"--rdzv-endpoint: expected HOST:PORT, got {endpoint!r}")
    return host, port


def _default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def _script(path: str | None) -> str:
    """launch/train.py, relative when we run from the repository root (shorter to read), else absolute."""
    script = Path(path) if path else REPO / "launch" / "train.py"
    if not script.is_file():
        raise LaunchError(f"--script: file not found: {script}")
    if path:
        return path
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def torchrun_args(opts: argparse.Namespace, nproc: int) -> list[str]:
    """torchrun's options for this node (without the script)."""
    low, high = _parse_nnodes(opts.nnodes)
    args = ["--nnodes", opts.nnodes, "--nproc-per-node", str(nproc)]
    if opts.rdzv_backend == "static":
        if high > low:
            raise LaunchError("--nnodes MIN:MAX (elastic) needs --rdzv-backend c10d")
        if opts.max_restarts:
            raise LaunchError("--max-restarts needs --rdzv-backend c10d: a static rendezvous cannot re-form the "
                              "group after a restart")
        if opts.node_rank is None or not opts.rdzv_endpoint:
            raise LaunchError("--rdzv-backend static needs --node-rank and --rdzv-endpoint (node 0's HOST:PORT)")
        if not 0 <= opts.node_rank < high:
            raise LaunchError(f"--node-rank: expected 0..{high - 1}, got {opts.node_rank}")
        host, port = _split_endpoint(opts.rdzv_endpoint)
        args += ["--rdzv-backend", "static", "--master-addr", host, "--master-port", port,
                 "--node-rank", str(opts.node_rank)]
    else:
        if opts.node_rank is not None:
            raise LaunchError("--node-rank applies to --rdzv-backend static only (c10d assigns node ranks)")
        if high == 1:
            # One node: torchrun's own c10d store on a free local port, so runs on one machine never collide.
            args.insert(0, "--standalone")
        else:
            if not opts.rdzv_endpoint:
                raise LaunchError("several nodes need --rdzv-endpoint HOST:PORT (a host every node reaches, "
                                  "e.g. the first node of the allocation)")
            _split_endpoint(opts.rdzv_endpoint)
            rdzv_id = opts.rdzv_id or os.environ.get("SLURM_JOB_ID") or "qpm-dist"
            args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", opts.rdzv_endpoint, "--rdzv-id", rdzv_id]
    if opts.max_restarts:
        args += ["--max-restarts", str(opts.max_restarts)]
    args += ["--signals-to-handle", SIGNALS_TO_HANDLE, "--shutdown-timeout", str(opts.shutdown_timeout)]
    return args


def deepspeed_args(opts: argparse.Namespace, nproc: int) -> list[str]:
    """DeepSpeed launcher options: one node, or one command per node (--no_ssh) from a shared hostfile."""
    low, high = _parse_nnodes(opts.nnodes)
    if high > low or opts.max_restarts:
        raise LaunchError("the deepspeed launcher has no elastic restarts; use --launcher torchrun")
    args = ["--num_gpus", str(nproc)]
    if high == 1:
        if opts.rdzv_endpoint:  # otherwise DeepSpeed's default port 29500, shared by every run on the machine
            host, port = _split_endpoint(opts.rdzv_endpoint)
            args += ["--master_addr", host, "--master_port", port]
        return args
    if not opts.hostfile or not opts.rdzv_endpoint or opts.node_rank is None:
        raise LaunchError("the deepspeed launcher on several nodes needs --hostfile, --rdzv-endpoint (node 0's "
                          "HOST:PORT) and --node-rank")
    host, port = _split_endpoint(opts.rdzv_endpoint)
    return ["--hostfile", opts.hostfile, "--no_ssh", "--node_rank", str(opts.node_rank), "--num_nodes", str(high),
            *args, "--master_addr", host, "--master_port", port]


def is_elastic(opts: argparse.Namespace) -> bool:
    low, high = _parse_nnodes(opts.nnodes)
    return opts.launcher == "torchrun" and (opts.max_restarts > 0 or low < high)


def build_command(opts: argparse.Namespace) -> tuple[dict[str, str], list[str]]:
    """The environment variables to set and the command line."""
    nproc = opts.nproc_per_node if opts.nproc_per_node is not None else _default_nproc()
    if nproc < 1:
        raise LaunchError(f"--nproc-per-node: expected a positive integer, got {nproc}")
    if opts.shutdown_timeout < 0:
        raise LaunchError(f"--shutdown-timeout: expected seconds >= 0, got {opts.shutdown_timeout}")
    if opts.launcher == "deepspeed":
        head = ["deepspeed", *deepspeed_args(opts, nproc)]
    else:
        head = ["torchrun", *torchrun_args(opts, nproc)]
    env = dict(ELASTIC_ENV) if is_elastic(opts) else {}
    return env, [*head, _script(opts.script), "run", opts.config, *opts.run_args]


def render(env: dict[str, str], command: list[str]) -> str:
    """As a shell command line: `VAR=value ... torchrun ...`."""
    return shlex.join([f"{key}={value}" for key, value in env.items()] + command)


def _check_config(opts: argparse.Namespace) -> None:
    """Unknown keys and wrong types fail here, on the submitting host, not after the job waited in a queue."""
    from qpm_dist.config import load_config

    parser = argparse.ArgumentParser(prog="qpm-dist launch CONFIG", add_help=False)
    parser.add_argument("--stage")
    parser.add_argument("overrides", nargs="*")
    run_args, unknown = parser.parse_known_args(opts.run_args)
    if unknown:
        raise LaunchError(f"unexpected arguments after the config: {' '.join(unknown)}")
    load_config(opts.config, run_args.overrides)


def run_torchrun(args: list[str]) -> int:
    """Run torchrun with `args` in this process; return an exit status that keeps the engine's 75."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(args)
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}  # a negative code -N: killed by signal N
        print(f"qpm-dist launch: workers failed with exit codes {sorted(codes)}", file=sys.stderr, flush=True)
        own = codes - {-signal.SIGTERM, -signal.SIGKILL}  # without the workers torchrun stopped
        if own == {PREEMPTED_EXIT_CODE}:
            print(f"qpm-dist launch: {STOPPED}", file=sys.stderr, flush=True)
        if own in ({PREEMPTED_EXIT_CODE}, {EXIT_BAD_INPUT}, {EXIT_NONFINITE}, {EXIT_UNAVAILABLE}):
            return own.pop()
        return 1
    except SignalException as exc:
        sig = signal.Signals(exc.sigval)
        print(f"qpm-dist launch: torchrun stopped by {sig.name}", file=sys.stderr, flush=True)
        if sig in (signal.SIGTERM, signal.SIGUSR1):
            print(f"qpm-dist launch: {STOPPED}", file=sys.stderr, flush=True)
            return PREEMPTED_EXIT_CODE
        return 128 + int(sig)
    return 0


def main(argv: list[str]) -> int:
    opts = build_parser().parse_args(argv)
    from qpm_dist.config import ConfigError

    try:
        _check_config(opts)
        env, command = build_command(opts)
    except (LaunchError, ConfigError) as exc:
        print(f"qpm-dist launch: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    if not opts.run:
        print(render(env, command), flush=True)
        return 0
    print(f"qpm-dist launch: running: {render(env, command)}", file=sys.stderr, flush=True)
    os.environ.update(env)
    if opts.launcher == "torchrun":
        return run_torchrun(command[1:])
    # The deepspeed launcher passes a worker's non-zero exit status (e.g. 75) through unchanged.
    return subprocess.call(command)
