"""`python -m qpm_dist ...` is `qpm-dist ...` (torchrun uses this form: `torchrun ... -m qpm_dist run ...`)."""

from qpm_dist.cli import main

raise SystemExit(main())
