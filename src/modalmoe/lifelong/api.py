"""Growing a trained model in memory: a new modality or a new task, each with new experts.

    from modalmoe.lifelong import add_modality, add_task
    grown = add_modality(model, "image", spec, experts=4, data=task.train)
    two = add_task(model, "t2", outputs=8, experts=4, previous="t1")

Both return a new model and leave the given one unchanged. Growth is a lifelong-learning
feature built on top of the model, so it lives here and the model knows nothing of it.
"""

from __future__ import annotations

from modalmoe.data.batch import MultimodalDataset
from modalmoe.lifelong.grow import grow_model
from modalmoe.lifelong.tasks import grow_task_model
from modalmoe.model.multimodal import MultimodalModel


def add_task(
    model: MultimodalModel,
    name: str,
    *,
    outputs: int,
    kind: str = "classification",
    experts: int = 0,
    previous: str = "task0",
) -> MultimodalModel:
    """A new model that learns task ``name`` with a fresh head of ``outputs`` and ``experts``
    more experts per MoE layer reserved for it (``modalmoe.lifelong.tasks``).

    The new model carries ``model``'s trained state; its head becomes the head of its task
    (``previous`` names it when the model has no task labels yet), and, before training,
    ``new(batch, task=previous)`` predicts exactly as ``model`` does. Freezing the old parts
    while training it: ``modalmoe.lifelong.grow.freeze_old``, or ``train.grow`` in a run
    (``modalmoe train --continue-from RUN --add-task LABEL``).

    Args:
        model: the trained model.
        name: the new task's label.
        outputs: its classes, labels or regression targets.
        kind: its head's kind (``classification``, ``multilabel``, ``regression``).
        experts: experts added per MoE layer, reserved for the new task.
        previous: the label of the model's own task, when it has none yet.
    """
    return grow_task_model(model, name, outputs=outputs, kind=kind, experts=experts, previous=previous).model


def add_modality(
    model: MultimodalModel,
    name: str,
    spec,
    *,
    encoder_config=None,
    experts: int = 0,
    data: MultimodalDataset | None = None,
) -> MultimodalModel:
    """A new model with modality ``name`` added and ``experts`` more experts per MoE layer
    reserved for it (``modalmoe.lifelong.grow_model``).

    The new model carries ``model``'s trained state (the old experts in the leading slice of
    each bank, new router rows at the mean of the old ones) and, before training, predicts
    exactly as ``model`` on inputs without ``name``. Freezing the old parts while training it:
    ``modalmoe.lifelong.grow.freeze_old``, or ``train.grow`` in a run.

    Args:
        model: the trained model.
        name: the new modality; spec: its ``ModalitySpec``.
        encoder_config: its ``EncoderConfig`` (None: the default for its kind).
        experts: experts added per MoE layer (token-choice routers only).
        data: the training split, to fit the new encoder's input statistics.
    """
    return grow_model(model, {name: spec}, encoders={name: encoder_config}, experts=experts, data=data).model
