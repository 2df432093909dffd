"""Training: the LightningModule, updaters (Kalman, gradient) and metrics."""

from rlekf.training.module import ForceFieldModule
from rlekf.training.updaters import GradientUpdater, KalmanUpdater

__all__ = ["ForceFieldModule", "GradientUpdater", "KalmanUpdater"]
