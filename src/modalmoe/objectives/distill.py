"""Knowledge distillation from a trained run (Hinton, Vinyals and Dean 2015, "Distilling the
Knowledge in a Neural Network").

    train:
      objectives:
        - {name: cross_entropy, weight: 0.5}
        - {name: distill, weight: 0.5, options: {teacher: runs/av/token-choice-s0, temperature: 2}}

The teacher is the best checkpoint of a run directory (``load_run_model``), frozen and in eval
mode. It is deliberately not a submodule of the objective: it is not in the student's
checkpoint, its optimizer, or ``.train()``. It sees the same batch with the same modalities
per sample as the student (after the student's modality dropout), under ``torch.no_grad``.

- classification: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over
  the batch; the ``T^2`` keeps the gradient scale independent of ``T``;
- regression: mean squared error to the teacher's prediction.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from modalmoe.data.batch import MultimodalBatch
from modalmoe.model.multimodal import ModelOutput, MultimodalModel
from modalmoe.objectives.base import Objective, has_data, logits_of, objectives, unwrap
from modalmoe.run import load_run_model, read_task_info

KINDS = ("classification", "regression")


def distill_loss(student: Tensor, teacher: Tensor, *, kind: str, temperature: float) -> Tensor:
    """The distillation loss of student outputs against teacher outputs (same shape).

    Args:
        student: [B, C] logits ([B] or [B, C] for regression).
        teacher: the teacher's, same shape.
        kind: ``classification`` or ``regression``.
        temperature: T (classification only).
    """
    if kind == "regression":
        return F.mse_loss(student, teacher.to(student.dtype))
    log_student = F.log_softmax(student / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.to(student.dtype) / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2


@objectives.register("distill")
class Distill(Objective):
    """Match a teacher run's outputs.

    Args:
        teacher: a run directory (``modalmoe train --out``) of the same task.
        temperature: softmax temperature T (> 0).
    """

    def __init__(self, *, teacher: str, temperature: float = 2.0) -> None:
        super().__init__()

        if not temperature > 0:
            raise ValueError(f"distill: temperature must be > 0, got {temperature}")
        self.temperature, self.source = float(temperature), str(teacher)
        model = load_run_model(teacher).requires_grad_(False)  # says so when ``teacher`` is not a run
        self.info = read_task_info(teacher)
        kind = model.head.kind if model.head is not None else None
        if kind not in KINDS:
            raise ValueError(
                f"distill: the teacher {self.source!r} has a {kind or 'embedding-only'} head; distillation "
                f"supports {' and '.join(KINDS)} heads"
            )
        # object.__setattr__: a plain attribute, not a submodule (see the module docstring).
        object.__setattr__(self, "teacher", model)

    def check_task(self, task) -> None:
        """Refuse a student task other than the teacher's (classes, outputs, modalities)."""
        train = task.train
        classes = list(train.classes) if train.classes is not None else None
        theirs = (self.info["task_type"], self.info["classes"])
        if (train.task_type, classes) != theirs:
            raise ValueError(
                f"distill: the teacher {self.source!r} was trained on {self.info['task']!r} "
                f"({theirs[0]}, classes {theirs[1]}) but the student trains on {task.name!r} "
                f"({train.task_type}, classes {classes}); distill from a run of the same task"
            )
        missing = sorted(set(self.teacher.modalities) - set(task.specs))
        if missing:
            raise ValueError(
                f"distill: the teacher {self.source!r} reads modalities {missing} that the student's task "
                f"does not carry (it has {sorted(task.specs)}); use a teacher trained on a subset of them"
            )

    def forward(self, output: ModelOutput, batch: MultimodalBatch, model) -> dict[str, Tensor]:
        student = logits_of(output, "distill")
        kind = unwrap(model).head.kind
        if kind != self.teacher.head.kind:
            raise ValueError(
                f"distill: the student has a {kind} head but the teacher {self.source!r} a "
                f"{self.teacher.head.kind} one; set model.head.kind to match"
            )
        teacher = self.teacher_outputs(output, batch, unwrap(model))
        if teacher.shape != student.shape:
            raise ValueError(
                f"distill: the student outputs {list(student.shape)} but the teacher {self.source!r} outputs "
                f"{list(teacher.shape)}; the two must be trained for the same task (classes)"
            )
        return {"loss": distill_loss(student, teacher, kind=self.teacher.head.kind, temperature=self.temperature)}

    @torch.no_grad()
    def teacher_outputs(self, output: ModelOutput, batch: MultimodalBatch, student: MultimodalModel) -> Tensor:
        """The teacher's outputs on ``batch``, given the modalities each sample's student
        encoders saw (``has_data(output)``, after modality dropout)."""
        seen = has_data(output)
        present = dict(batch.present)
        for i, name in enumerate(student.modalities):
            present[name] = seen[:, i].to(batch.present[name].device)
        missing = [m for m in self.teacher.modalities if m not in present]
        if missing:
            raise ValueError(f"distill: the batch carries no {missing} for the teacher {self.source!r}")
        device = output.fused.device
        if self.teacher.mask_token.device != device:
            self.teacher.to(device)
        return self.teacher(dataclasses.replace(batch, present=present)).logits

    def extra_repr(self) -> str:
        return f"teacher={Path(self.source).name!r}, temperature={self.temperature:g}"
