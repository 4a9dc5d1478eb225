"""Evaluation: task metrics (torchmetrics), robustness over modality subsets and graded noise
(MultiBench's relative and effective robustness), and cross-modal retrieval.

    from modalmoe.evaluate import evaluate
    report = evaluate(model, task.test, noise_levels=(0, 2, 4), train_scale=task.train)
    report.print()
"""

from modalmoe.evaluate.metrics import (
    METRICS,
    PRIMARY,
    classification_metrics,
    multilabel_metrics,
    regression_metrics,
    task_metrics,
)
from modalmoe.evaluate.retrieval import cross_modal_retrieval, retrieval_metrics
from modalmoe.evaluate.robustness import (
    effective_robustness,
    maxmin_normalize,
    modality_subsets,
    relative_robustness,
)
from modalmoe.evaluate.runner import ALL, EvalReport, NoiseRow, Predictions, Robustness, SubsetRow, evaluate, predict

__all__ = [
    "ALL",
    "METRICS",
    "PRIMARY",
    "EvalReport",
    "NoiseRow",
    "Predictions",
    "Robustness",
    "SubsetRow",
    "classification_metrics",
    "cross_modal_retrieval",
    "effective_robustness",
    "evaluate",
    "maxmin_normalize",
    "modality_subsets",
    "multilabel_metrics",
    "predict",
    "regression_metrics",
    "relative_robustness",
    "retrieval_metrics",
    "task_metrics",
]
