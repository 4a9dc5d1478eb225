"""Training: the trainer, checkpoints, prediction files."""

from modalmoe.train.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from modalmoe.train.trainer import Trainer, TrainingError, TrainResult, load_run_model, read_run_config

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "load_checkpoint",
    "load_run_model",
    "read_run_config",
    "save_checkpoint",
]
