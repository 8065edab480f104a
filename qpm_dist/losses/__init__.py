"""Training objectives: cross-entropy plus the feature diversity loss."""

from qpm_dist.losses.classification import ClassificationLoss
from qpm_dist.losses.fdl import feature_diversity_loss

__all__ = ["ClassificationLoss", "feature_diversity_loss"]
