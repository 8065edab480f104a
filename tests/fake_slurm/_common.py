"""Shared by the stand-in SLURM commands in this folder (tests/test_slurm.py puts the folder first on PATH).

Every call appends one JSON line {"cmd", "argv", "env", "pid"} to $FAKE_SLURM_LOG, so a test can read back
exactly which commands a batch script ran, with which arguments and environment.
"""

import json
import os
import re
import sys

# The environment variables worth recording (the full environment is large and mostly irrelevant).
RECORDED_ENV = ("SLURM_", "SRUN_", "MAX_", "PYTHON", "GPUS_PER_NODE", "TORCH", "NCCL_", "SOLVER_")


def record(cmd: str, **extra) -> None:
    env = {k: v for k, v in os.environ.items() if k.startswith(RECORDED_ENV)}
    entry = {"cmd": cmd, "argv": sys.argv[1:], "env": env, "pid": os.getpid(), **extra}
    with open(os.environ["FAKE_SLURM_LOG"], "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def expand_hostlist(text: str) -> list[str]:
    """SLURM's compact host lists: 'gpu[01-03,07],cpu1' -> gpu01 gpu02 gpu03 gpu07 cpu1."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,]+)", text):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts
