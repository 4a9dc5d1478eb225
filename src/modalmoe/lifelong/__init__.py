"""Lifelong multimodal learning: continue a trained run with a new modality by adding experts.

    modalmoe train --continue-from runs/audio --add-modality image --experts 4 --freeze experts

- ``grow.py``: ``grow_config`` (the continued experiment), ``grow_model`` (an in-memory model
  with more modalities and experts, ``MultimodalModel.add_modality``), ``prepare_growth``
  (what the trainer freezes and regularises in a grown run);
- ``state.py``: per-expert tensors and how a grown one takes the run's values;
- ``ewc.py``: Elastic Weight Consolidation (Kirkpatrick et al. 2017) against the run.

New experts are reserved for the new modality (``token_choice``'s ``reserved``), so tokens of
the old modalities route exactly as before and a grown model predicts exactly as the run did
on inputs without the new modality until training changes the old parts (``freeze`` decides
which may change). Adding a task (a new head) is not implemented yet.
"""

from modalmoe.lifelong.ewc import EWCPenalty, fisher_diagonal
from modalmoe.lifelong.grow import GrowError, GrowResult, Growth, grow_config, grow_model, prepare_growth

__all__ = [
    "EWCPenalty",
    "GrowError",
    "GrowResult",
    "Growth",
    "fisher_diagonal",
    "grow_config",
    "grow_model",
    "prepare_growth",
]
