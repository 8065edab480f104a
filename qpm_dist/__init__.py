"""qpm-dist: distributed training of globally interpretable image classifiers (QPM and the other methods of qpm_dist.methods)."""

__version__ = "0.1.0"
