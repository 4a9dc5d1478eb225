"""Distillation: the KD loss is 0 for a student equal to its teacher and positive otherwise;
the teacher sees the student's modalities, stays out of the student's state and optimizer;
a task mismatch is refused; a tiny dense student distilled from an MoE teacher learns."""

import json

import pytest
import torch
import torch.nn.functional as F

from modalmoe.data.tasks import load_task
from modalmoe.model.multimodal import build_model
from modalmoe.model.presets import get_preset
from modalmoe.objectives import build_objectives
from modalmoe.objectives.distill import Distill, distill_loss
from modalmoe.train import Trainer, load_checkpoint

BASE = ["task_options.num_samples=300", "task_options.signal=2.0", "train.epochs=3", "train.lr=0.003"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "teacher"
    Trainer(get_preset("tiny/token-choice", overrides=BASE), out, progress=False).fit()
    return out


def _kd(teacher, temperature=2.0):
    return [
        {"name": "cross_entropy", "weight": 0.5},
        {"name": "distill", "weight": 0.5, "options": {"teacher": str(teacher), "temperature": temperature}},
    ]


def test_distill_loss_is_zero_for_the_teacher_itself_and_positive_otherwise(teacher_run):
    cfg = get_preset("tiny/dense-early", overrides=BASE)
    task = load_task(cfg.task, **cfg.task_options)
    batch = task.test.batch(range(32))
    losses = build_objectives(_kd(teacher_run, temperature=3.0), head_kind="classification")
    distill = losses.objectives["distill"]
    teacher = distill.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert list(losses.state_dict()) == [] and list(losses.parameters()) == []  # not a submodule
    with torch.no_grad():
        assert distill(teacher(batch), batch, teacher)["loss"] == 0.0
    torch.manual_seed(0)
    student = build_model(cfg.model, task.specs, outputs=2).fit(task.train)
    output = student(batch)
    loss = distill(output, batch, student)["loss"]
    t = teacher(batch).logits.detach() / 3.0
    p_teacher = t.softmax(-1)
    expected = 9.0 * (p_teacher * (p_teacher.log() - (output.logits / 3.0).log_softmax(-1))).sum(-1).mean()
    assert loss > 0 and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert student.head.linear.weight.grad.abs().sum() > 0
    total, terms = losses(output, batch, student)
    assert set(terms) == {"cross_entropy", "distill"}
    assert total.item() == pytest.approx(0.5 * terms["cross_entropy"].item() + 0.5 * terms["distill"].item())
    regression = distill_loss(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]), kind="regression", temperature=2)
    assert regression.item() == pytest.approx(F.mse_loss(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])).item())


def test_the_teacher_sees_the_modalities_the_student_saw(teacher_run):
    cfg = get_preset("tiny/dense-early", overrides=BASE)
    task = load_task(cfg.task, **cfg.task_options)
    batch = task.test.batch(range(16))
    distill = Distill(teacher=str(teacher_run))
    student = build_model(cfg.model, task.specs, outputs=2).fit(task.train)
    with torch.no_grad():
        output = student(batch, modalities=["m0", "m2"])
        seen = distill.teacher_outputs(output, batch, student)
        expected = distill.teacher(batch, modalities=["m0", "m2"]).logits
        assert torch.equal(seen, expected)
        assert not torch.equal(seen, distill.teacher(batch).logits)


def test_a_teacher_of_another_task_is_refused(teacher_run, tmp_path):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Distill(teacher=str(teacher_run), temperature=0)
    cfg = get_preset(
        "tiny/dense-early", overrides=[*BASE, "task_options.num_classes=4", f"train.objectives={_kd(teacher_run)}"]
    )
    with pytest.raises(ValueError, match="distill from a run of the same task"):
        Trainer(cfg, tmp_path / "student", progress=False).build()


def test_a_tiny_dense_student_distilled_from_a_moe_teacher_learns(teacher_run, tmp_path):
    cfg = get_preset("tiny/dense-early", overrides=[*BASE, f"train.objectives={_kd(teacher_run)}"])
    trainer = Trainer(cfg, tmp_path / "student", progress=False)
    result = trainer.fit()
    assert result.test["accuracy"] > 0.5 + 0.2, result.test  # chance: 1/2
    student, _ = trainer.build()
    saved = load_checkpoint(tmp_path / "student" / "checkpoints" / "last.safetensors")
    stored = {k for k in saved.tensors if k.startswith("module/")}
    assert stored == {f"module/model.{k}" for k in student.state_dict()}  # the student only, no teacher
    lines = (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["split"] == "train" and first["distill"] > 0
