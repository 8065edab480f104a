"""Entry point for torchrun, srun and the deepspeed launcher: `torchrun ... launch/train.py run CONFIG ...`.

No logic of its own: it drops the `--local_rank` argument the deepspeed launcher appends (the rank comes
from the environment) and hands over to the `qpm-dist` command line.
"""

import sys

from qpm_dist.cli import main

if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith(("--local_rank", "--local-rank"))]
    raise SystemExit(main(argv))
