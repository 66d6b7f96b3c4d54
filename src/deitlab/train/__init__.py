"""Training: the DeiT recipe engine, distillation losses, distributed set-up."""
from .config import ConfigError, TrainConfig
from .distill import DistillationLoss
from .engine import TrainingDiverged, evaluate, train

__all__ = ['ConfigError', 'TrainConfig', 'DistillationLoss', 'TrainingDiverged', 'evaluate', 'train']
