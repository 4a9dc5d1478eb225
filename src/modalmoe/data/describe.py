"""What a task holds, and how well a linear model does on each modality and on all of them.

The baselines are the floor every multimodal model should clear: a logistic regression
(scikit-learn) trained on the real train split and scored on valid and test, per modality
and on all modalities' features concatenated. Features per kind: images flattened (average-pooled
first when larger than ``MAX_IMAGE_FEATURES`` values: 64x64 RGB becomes 16x16 RGB);
sequences summarised by the mean and standard deviation of each channel over their valid
steps; vectors as they are; tabular numeric columns as they are and categorical columns
one-hot; text as TF-IDF of words and word pairs (fitted on train). A sample lacking a
modality gets zeros for its features plus an "absent" indicator column, so every model
sees every sample.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from modalmoe.data.batch import ModalitySpec, MultimodalDataset, Task

log = logging.getLogger(__name__)


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
        names = train.classes or [str(c) for c in range(len(counts))]
        out["classes"] = dict(zip(names, counts, strict=True))
        # The answer prior: accuracy of always predicting train's most frequent class.
        majority = int(np.argmax(counts))
        out["majority"] = {"class": names[majority]} | {
            split: round(float((data.target == majority).float().mean()), 4)
            for split, data in task.splits.items()
            if split != "train" and len(data)
        }
    return out


def linear_baselines(task: Task, *, seed: int = 0) -> dict[str, dict[str, float]]:
    """Accuracy (classification) or R^2 (regression) of a linear model per modality and on all.

    A feature set over the budget (``MAX_DENSE_VALUES``: train rows x dense columns, e.g.
    easy-vqa's 34,680 rows x 769 pooled pixels) is fitted on a seeded sample of the train rows
    that fits it; its scores then carry ``train_rows`` and a warning says so. Valid and test are always
    scored in full (in chunks of rows, so their features are never all in memory at once).

    Returns:
        ``{modality or "all": {"valid": score, "test": score}}`` (plus ``"train_rows"`` when sampled).
    """
    # Lazy: scikit-learn takes about a second to import and only describe and the bench fit baselines.
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    featurizers = {name: _Featurizer(spec).fit(task.train) for name, spec in task.specs.items()}
    groups = {name: [name] for name in task.specs}
    if len(task.specs) > 1:
        groups["all"] = list(task.specs)
    classification = task.train.task_type == "classification"
    metric = accuracy_score if classification else r2_score
    results = {}
    for group, names in groups.items():
        width = sum(_dense_width(task.specs[n]) for n in names)
        chunk = max(1, MAX_DENSE_VALUES // width) if width else None
        train = task.train
        sampled = chunk is not None and len(train) > chunk
        if sampled:
            rows = np.random.default_rng(seed).choice(len(train), size=chunk, replace=False)
            train = train.subset(np.sort(rows))
            log.warning(
                "linear baseline %r: fitted on a seeded sample of %d of the %d train rows (%d dense features; "
                "the budget is %d values); valid and test are scored in full",
                group,
                len(train),
                len(task.train),
                width,
                MAX_DENSE_VALUES,
            )
        model = LogisticRegression(max_iter=2000, C=1.0, random_state=seed) if classification else Ridge(alpha=1.0)
        pipeline = make_pipeline(StandardScaler(with_mean=False), model)
        pipeline.fit(_features(featurizers, names, train), train.target.numpy())
        scores = {}
        for split, data in task.splits.items():
            if split == "train":
                continue
            parts = [data] if chunk is None or len(data) <= chunk else _chunks(data, chunk)
            predicted = [pipeline.predict(_features(featurizers, names, part)) for part in parts]
            scores[split] = round(float(metric(data.target.numpy(), np.concatenate(predicted))), 4)
        if sampled:
            scores["train_rows"] = len(train)
        results[group] = scores
    return results


#: The most dense feature values (rows x columns of the non-text features) a baseline holds at once:
#: 2M values keep a fit to about a minute on two cores (easy-vqa: 2,600 rows of 769 pooled-pixel features).
MAX_DENSE_VALUES = 2_000_000


def _dense_width(spec: ModalitySpec) -> int:
    """Roughly how many dense feature columns ``_Featurizer`` makes of ``spec`` (0 for sparse TF-IDF)."""
    if spec.kind == "text":
        return 0
    fixed = [d for d in spec.shape if d is not None]
    if spec.kind == "sequence":
        return 2 * int(fixed[-1]) + 1
    if spec.kind == "image":
        f = _pool_factor(spec.shape)
        return int(fixed[0]) * -(-int(fixed[1]) // f) * -(-int(fixed[2]) // f) + 1
    return int(np.prod(fixed)) + 1 + sum(spec.categorical.values())


#: Images with more values than this are average-pooled for their baseline features (64x64 RGB -> 16x16 RGB).
MAX_IMAGE_FEATURES = 1024


def _pool_factor(shape: tuple) -> int:
    """The smallest pooling factor that leaves an image [C, H, W] at most ``MAX_IMAGE_FEATURES`` values."""
    channels, height, width = (int(d) for d in shape)
    factor = 1
    while channels * -(-height // factor) * -(-width // factor) > MAX_IMAGE_FEATURES:
        factor += 1
    return factor


def _chunks(data: MultimodalDataset, size: int):
    for start in range(0, len(data), size):
        yield data.subset(np.arange(start, min(start + size, len(data))))


def _features(featurizers: dict, names: list[str], data: MultimodalDataset):
    from scipy import sparse  # lazy, as scikit-learn above: only the baselines need it

    return sparse.hstack([featurizers[n].transform(data) for n in names], format="csr")


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
        elif kind == "image" and _pool_factor(self.spec.shape) > 1:
            x = torch.nn.functional.avg_pool2d(value, _pool_factor(self.spec.shape), ceil_mode=True)
            x = x.reshape(len(value), -1).numpy()
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
