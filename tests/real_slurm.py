"""A real SLURM on this one machine, for tests/test_slurm_real.py: munged, slurmctld and two slurmd (two nodes of
one partition), all started from a temporary folder and stopped by PID.

What the fakes in tests/fake_slurm cannot show needs the real thing: which job id an array task gets, what
`scontrol requeue` of that id does, how long SLURM holds a requeued job, two jobs on one node. Debian's
`slurm-wlm` and `munge` are installed with apt when missing (root only); when that or a daemon fails,
`start_cluster` raises `Unavailable` with the reason, and the tests skip with it.

The two nodes are two slurmd processes (`slurmd -N NAME`) with their own ports on localhost. Their names
must resolve on this machine, because the sbatch scripts use the first node's name as rendezvous host:
this host's name and `localhost`. Each has 2 CPUs (CR_CPU: two 1-CPU jobs share a node) and two stand-in
GPUs (a GRES whose device files are /dev/null and /dev/zero), so that `--gpus-per-node=1` works and two
such jobs fit on a node. Short timeouts keep the tests quick: a
requeued job waits `cred_expire` seconds before it may start again (SLURM's default is 120 s; here
REQUEUE_HOLD_S), and the scheduler runs every second.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
# How long a requeued job is held (AuthInfo cred_expire; SLURM's default 120 s).
REQUEUE_HOLD_S = 10


class Unavailable(Exception):
    """A real SLURM cannot run here; the message says why (the tests skip with it)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> None:
    """apt-get install slurm-wlm and munge when their daemons are missing (needs root and apt-get)."""
    if all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in DAEMONS):
        return
    if os.geteuid() != 0:
        raise Unavailable(f"{', '.join(PACKAGES)} not installed and not root (apt-get install needs root)")
    if not shutil.which("apt-get"):
        raise Unavailable(f"{', '.join(PACKAGES)} not installed and no apt-get on this machine")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:  # maybe stale package lists
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr.strip()[-500:]}")


def node_names() -> list[str]:
    """Two names of this machine that resolve to it (the rendezvous host is a node name)."""
    names = []
    for name in (socket.gethostname(), "localhost"):
        try:
            socket.gethostbyname(name)
        except OSError:
            continue
        if name not in names:
            names.append(name)
    if len(names) < 2:
        raise Unavailable(f"need two resolvable names for this host as node names, found {names}")
    return names


@dataclass
class Cluster:
    """A running one-host SLURM: `env` is the environment for sbatch/squeue/scontrol (SLURM_CONF)."""

    root: Path
    nodes: list[str]
    conf: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def job(self, job: str) -> dict[str, str]:
        """`scontrol show job -o JOB` as a dict per record; for an array id, several lines: use `jobs`."""
        (record,) = self.jobs(job)
        return record

    def jobs(self, job: str) -> list[dict[str, str]]:
        out = self.run("scontrol", "show", "job", "-o", job).stdout
        return [dict(word.split("=", 1) for word in line.split() if "=" in word) for line in out.splitlines()
                if line.strip()]

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cancel_all(self, timeout: float = 60) -> None:
        """scancel every job of this cluster and wait until none runs: slurmstepd and the job's processes
        outlive a stopped slurmd."""
        if self.processes.get("slurmctld") is None or self.processes["slurmctld"].poll() is not None:
            return
        jobs = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
        if not jobs:
            return
        self.run("scancel", *jobs, check=False)
        deadline = time.time() + timeout
        while time.time() < deadline and self.run("squeue", "-h", "-o", "%A", check=False).stdout.split():
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons by their PIDs (slurmd first, munged last), then remove the state
        folders."""
        try:
            self.cancel_all()
        except (OSError, subprocess.SubprocessError):
            pass
        for name in sorted(self.processes, key=lambda n: ("slurmd" in n, n != "munged"), reverse=True):
            proc = self.processes[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.processes.clear()
        for folder in ("state", "spool"):
            shutil.rmtree(self.root / folder, ignore_errors=True)


def write_config(root: Path, nodes: list[str], munge_socket: Path, requeue_hold_s: int | None) -> Path:
    ctld_port, node_ports = free_port(), [free_port() for _ in nodes]
    cred_expire = "" if requeue_hold_s is None else f",cred_expire={requeue_hold_s}"
    node_lines = "\n".join(
        f"NodeName={name} NodeHostname={name} NodeAddr=127.0.0.1 Port={port} CPUs=2 RealMemory=2000 "
        f"Gres=gpu:2 State=UNKNOWN" for name, port in zip(nodes, node_ports))
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=qpmtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}{cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
MessageTimeout=20
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    # Stand-in GPUs: SLURM counts gpu GRES by their device files; nothing opens them (no task/cgroup plugin).
    (root / "gres.conf").write_text("".join(f"NodeName={name} Name=gpu File=/dev/null,/dev/zero\n" for name in nodes))
    return conf


def _wait(condition, what: str, timeout: float, cluster: Cluster) -> None:
    deadline = time.time() + timeout
    while not condition():
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                raise Unavailable(f"{name} exited with {proc.returncode} before {what}: "
                                  f"{cluster.log(name)[-1500:]}")
        if time.time() > deadline:
            raise Unavailable(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def start_cluster(root: Path, requeue_hold_s: int | None = REQUEUE_HOLD_S) -> Cluster:
    """Install if needed, write the config under `root`, start munged, slurmctld and one slurmd per node, and
    wait until both nodes are idle. Raises Unavailable (daemons already started are stopped).
    `requeue_hold_s=None` keeps SLURM's default hold of a requeued job (cred_expire, 120 s)."""
    ensure_installed()
    nodes = node_names()
    for sub in ("state", "spool", "run", "log", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    for node in nodes:
        (root / "spool" / node).mkdir(exist_ok=True)
    munge_socket = root / "munge" / "munge.socket"
    conf = write_config(root, nodes, munge_socket, requeue_hold_s)
    cluster = Cluster(root=root, nodes=nodes, conf=conf)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)

    def daemon(name: str, *cmd: str) -> None:
        log = open(root / "log" / f"{name}.out", "w")
        cluster.processes[name] = subprocess.Popen(list(cmd), env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=True)

    try:
        # -F: foreground, so the Popen's PID is the daemon's; --force: run as root with these permissions.
        daemon("munged", "munged", "-F", "--force", f"--socket={munge_socket}", f"--key-file={key}",
               f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/munged.seed",
               f"--log-file={root}/log/munged.log")
        _wait(munge_socket.exists, "munged's socket", 30, cluster)
        daemon("slurmctld", "slurmctld", "-D", "-i", "-f", str(conf))
        _wait(lambda: cluster.run("scontrol", "ping", check=False).returncode == 0, "slurmctld", 60, cluster)
        for node in nodes:
            daemon(f"slurmd-{node}", "slurmd", "-D", "-N", node, "-f", str(conf))

        def nodes_idle() -> bool:
            out = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            return all(states.get(n, "").startswith("idle") for n in nodes)

        _wait(nodes_idle, "both nodes idle", 60, cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster
