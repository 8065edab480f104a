"""Run several `qpm-dist run` commands in ONE torchrun launch (test_deepspeed_methods.py's method matrix).

    torchrun --nproc-per-node 2 tests/runs_in_one_group.py "CONFIG --stage STAGE" "CONFIG2 --stage STAGE2" ...

Each argument is one command line of `qpm-dist run`, executed by the CLI itself (config check, data, stages,
exit code). Only the process group outlives a command: `cmd_run` would destroy it at its end, and starting
torch, DeepSpeed and the group again costs about 25 s per launch on 2 loaded cores, more than the runs
themselves. Exits with the first failing command's code.
"""

import shlex
import sys

from qpm_dist import cli, dist

_shutdown = dist.shutdown


def main(commands: list[str]) -> int:
    dist.shutdown = lambda: None  # keep the group between commands (dist.init reuses it)
    try:
        for command in commands:
            code = cli.main(["run", *shlex.split(command)])
            if code != 0:
                print(f"runs_in_one_group: `qpm-dist run {command}` exited with {code}", file=sys.stderr, flush=True)
                return code
        return 0
    finally:
        _shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
