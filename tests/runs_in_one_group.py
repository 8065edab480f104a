"""Run several `qpm-dist run` commands in ONE torchrun launch (test_deepspeed_methods.py's method matrix).

    torchrun --nproc-per-node 2 tests/runs_in_one_group.py "CONFIG --stage STAGE" "CONFIG2 --stage STAGE2" ...

Each argument is one command line of `qpm-dist run`, executed by the CLI itself (config check, data, stages,
exit code). Only the process group outlives a command: `cmd_run` would destroy it at its end, and starting
torch, DeepSpeed and the group again costs about 25 s per launch on 2 loaded cores, more than the runs
themselves. Exits with the first failing command's code.

At the end it checks that `dist.shutdown()` left no DeepSpeed engine and no cached process group alive: one
that is destroyed at interpreter exit instead aborts the process there now and then ("terminate called without
an active exception", see `dist.shutdown`), which made this launch fail after all its runs had passed.
"""

import gc
import shlex
import sys

from qpm_dist import cli, dist

_shutdown = dist.shutdown


def main(commands: list[str]) -> int:
    dist.shutdown = lambda: None  # keep the group between commands (dist.init reuses it)
    try:
        code = run_all(commands)
    finally:
        _shutdown()
    leftovers = leftover_references()
    if leftovers:
        print(f"runs_in_one_group: alive after dist.shutdown(): {', '.join(leftovers)}", file=sys.stderr, flush=True)
    return code or (3 if leftovers else 0)


def run_all(commands: list[str]) -> int:
    for command in commands:
        code = cli.main(["run", *shlex.split(command)])
        if code != 0:
            print(f"runs_in_one_group: `qpm-dist run {command}` exited with {code}", file=sys.stderr, flush=True)
            return code
    return 0


def leftover_references() -> list[str]:
    """What still references DeepSpeed's engine or process groups after the shutdown."""
    gc.collect()
    found = sorted({type(o).__name__ for o in gc.get_objects()
                    if type(o).__name__ in ("DeepSpeedEngine", "DeepSpeedZeroOptimizer", "DistributedDataParallel")})
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None and groups._WORLD_GROUP is not None:
        found.append("deepspeed.utils.groups._WORLD_GROUP")
    return found


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
