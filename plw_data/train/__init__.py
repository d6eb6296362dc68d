"""`plw-train`: config, DeepSpeed config, data order, model, the loop, checkpoints, schedules, plots."""

from .config import TrainConfig
from .trainer import Trainer, TrainingError, train

__all__ = ["TrainConfig", "Trainer", "TrainingError", "train"]
