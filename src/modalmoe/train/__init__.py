"""Training: the trainer, checkpoints, prediction files."""

from modalmoe.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from modalmoe.run import RunDir, load_run_model, read_run_config
from modalmoe.train.trainer import Trainer, TrainingError, TrainResult

__all__ = [
    "Checkpoint",
    "RunDir",
    "CheckpointError",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "load_checkpoint",
    "load_run_model",
    "read_run_config",
    "save_checkpoint",
]
