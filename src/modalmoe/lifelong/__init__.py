"""Lifelong multimodal learning: continue a trained run with a new modality or a new task by
adding experts.

    modalmoe train --continue-from runs/audio --add-modality image --experts 4 --freeze experts
    modalmoe train --continue-from runs/t1 --add-task t2 --task-option seed=2 --experts 4

- ``grow.py``: ``grow_config`` (the continued experiment), ``grow_model`` (an in-memory model
  with more modalities and experts; ``add_modality``), ``prepare_growth``
  (what the trainer freezes and regularises in a grown run);
- ``tasks.py``: ``grow_task_config`` / ``continue_task`` (the experiment that learns a new
  task with a new head), ``grow_task_model`` (``add_task``), ``task_data``
  (an earlier task's data, for evaluating it);
- ``state.py``: per-expert tensors and how a grown one takes the run's values;
- ``ewc.py``: Elastic Weight Consolidation (Kirkpatrick et al. 2017) against the run.

New experts are reserved for the new modality (``model.moe.reserved.modalities``, an expert
mask each MoE layer applies, ``modalmoe.moe.masks``), so tokens of
the old modalities route exactly as before and a grown model predicts exactly as the run did
on inputs without the new modality until training changes the old parts (``freeze`` decides
which may change). Experts added for a task are reserved for it in the same way
(``model.moe.reserved.tasks``; the model passes each sample's task id): earlier tasks, predicted through their own heads
(``model(batch, task=label)``), route exactly as before.
"""

from modalmoe.lifelong.api import add_modality, add_task
from modalmoe.lifelong.ewc import EWCPenalty, fisher_diagonal
from modalmoe.lifelong.grow import (
    GrowError,
    GrowResult,
    Growth,
    GrowthCallback,
    grow_config,
    grow_model,
    grow_transform,
    growth_callbacks,
    prepare_growth,
)
from modalmoe.lifelong.tasks import continue_task, grow_task_config, grow_task_model, task_data

__all__ = [
    "EWCPenalty",
    "add_modality",
    "add_task",
    "GrowError",
    "GrowResult",
    "Growth",
    "GrowthCallback",
    "continue_task",
    "fisher_diagonal",
    "grow_config",
    "grow_model",
    "grow_transform",
    "growth_callbacks",
    "grow_task_config",
    "grow_task_model",
    "prepare_growth",
    "task_data",
]
