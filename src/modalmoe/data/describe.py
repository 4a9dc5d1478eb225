"""What a task holds, and how well a linear model does on each modality and on all of them.

The baselines are the floor every multimodal model should clear: a logistic regression
(scikit-learn) trained on the real train split and scored on valid and test, per modality
and on all modalities' features concatenated. Features per kind: images flattened;
sequences summarised by the mean and standard deviation of each channel over their valid
steps; vectors as they are; tabular numeric columns as they are and categorical columns
one-hot; text as TF-IDF of words and word pairs (fitted on train). A sample lacking a
modality gets zeros for its features plus an "absent" indicator column, so every model
sees every sample.
"""

from __future__ import annotations

import numpy as np
import torch

from modalmoe.data.batch import ModalitySpec, MultimodalDataset, Task


def summary(task: Task) -> dict:
    """Sizes, shapes, classes and modalities of ``task`` (JSON-serialisable)."""
    train = task.train
    modalities = {}
    for name, spec in task.specs.items():
        info = {"kind": spec.kind, "shape": ["L" if d is None else d for d in spec.shape]}
        if spec.description:
            info["description"] = spec.description
        if spec.categorical:
            info["categorical"] = {spec.columns[i] if spec.columns else str(i): n for i, n in spec.categorical.items()}
        if spec.variable_length:
            lengths = torch.cat([d.lengths[name] for d in task.splits.values()])
            info["length"] = {
                "min": int(lengths.min()),
                "median": float(lengths.float().median()),
                "max": int(lengths.max()),
            }
        present = torch.cat([d.present[name] for d in task.splits.values()])
        info["present"] = round(float(present.float().mean()), 4)
        modalities[name] = info
    out = {
        "name": task.name,
        "task_type": train.task_type,
        "splits": {k: len(v) for k, v in task.splits.items()},
        "modalities": modalities,
    }
    if train.task_type == "classification":
        counts = torch.bincount(train.target, minlength=train.num_classes).tolist()
        out["classes"] = dict(zip(train.classes or [str(c) for c in range(len(counts))], counts, strict=True))
    return out


def linear_baselines(task: Task, *, seed: int = 0) -> dict[str, dict[str, float]]:
    """Accuracy (classification) or R^2 (regression) of a linear model per modality and on all.

    Returns:
        ``{modality or "all": {"valid": score, "test": score}}``.
    """
    from scipy import sparse
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    featurizers = {name: _Featurizer(spec).fit(task.train) for name, spec in task.specs.items()}
    feats = {split: {n: f.transform(data) for n, f in featurizers.items()} for split, data in task.splits.items()}
    groups = {name: [name] for name in task.specs}
    if len(task.specs) > 1:
        groups["all"] = list(task.specs)
    results = {}
    for group, names in groups.items():
        x = {split: sparse.hstack([feats[split][n] for n in names], format="csr") for split in task.splits}
        if task.train.task_type == "classification":
            model = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
        else:
            model = Ridge(alpha=1.0)
        pipeline = make_pipeline(StandardScaler(with_mean=False), model)
        pipeline.fit(x["train"], task.train.target.numpy())
        results[group] = {
            split: round(float(pipeline.score(x[split], task.splits[split].target.numpy())), 4)
            for split in task.splits
            if split != "train"
        }
    return results


class _Featurizer:
    """Fixed-width features of one modality, fitted on the train split."""

    def __init__(self, spec: ModalitySpec) -> None:
        self.spec = spec
        self.vectorizer = None
        self.categories: dict[int, int] = {}

    def fit(self, data: MultimodalDataset) -> _Featurizer:
        if self.spec.kind == "text":
            from sklearn.feature_extraction.text import TfidfVectorizer

            texts = [
                t for t, p in zip(data.inputs[self.spec.name], data.present[self.spec.name].tolist(), strict=True) if p
            ]
            self.vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=50_000, sublinear_tf=True)
            self.vectorizer.fit(texts)
        return self

    def transform(self, data: MultimodalDataset):
        """-> [N, F] scipy sparse matrix (features, then the absent indicator)."""
        from scipy import sparse

        name, kind = self.spec.name, self.spec.kind
        present = data.present[name].numpy()
        absent = sparse.csr_matrix((~present)[:, None].astype(np.float32))
        value = data.inputs[name]
        if kind == "text":  # absent rows are "" and so all zero; kept sparse (tens of thousands of columns)
            x = self.vectorizer.transform([t if p else "" for t, p in zip(value, present, strict=True)])
            return sparse.hstack([x, absent], format="csr")
        if kind == "sequence":
            mask = (torch.arange(value.shape[1]) < data.lengths[name].unsqueeze(1)).unsqueeze(-1).float()
            count = mask.sum(1).clamp(min=1)
            mean = (value * mask).sum(1) / count
            std = (((value - mean.unsqueeze(1)) ** 2 * mask).sum(1) / count).sqrt()
            x = torch.cat([mean, std], dim=1).numpy()
        elif kind == "tabular":
            x = self._tabular(value.numpy())
        else:
            x = value.reshape(len(value), -1).numpy()
        x = np.where(present[:, None], x, 0.0).astype(np.float32)
        return sparse.hstack([sparse.csr_matrix(x), absent], format="csr")

    def _tabular(self, value: np.ndarray) -> np.ndarray:
        parts = []
        for column in range(value.shape[1]):
            if column in self.spec.categorical:
                codes = value[:, column].astype(np.int64)
                parts.append(np.eye(self.spec.categorical[column], dtype=np.float32)[codes])
            else:
                parts.append(value[:, column : column + 1])
        return np.concatenate(parts, axis=1)
