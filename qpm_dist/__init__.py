"""qpm-dist: distributed training of globally interpretable image classifiers (QPM, Q-SENN, SLDD)."""

__version__ = "0.1.0"
