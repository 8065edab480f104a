"""`python -m qpm_dist ...` is `qpm-dist ...` (torchrun uses this form: `torchrun ... -m qpm_dist run ...`)."""

from qpm_dist.cli import main

if __name__ == "__main__":  # guarded: worker processes started with "spawn" re-import this module
    raise SystemExit(main())
