"""Means over repeated runs (seeds, folds) with Student-t confidence intervals.

    summarize([0.91, 0.93, 0.92]).ci_low     # a 95% interval of the mean over three runs

The bench (``bench/stats.py``) and K-fold training (``train/folds.py``) report the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and a Student-t confidence interval of the mean.

    Attributes:
        mean: the mean.
        std: the sample standard deviation (``ddof=1``; 0 for one value).
        ci_low, ci_high: the interval's ends (both the mean for one value, or when all
            values are equal: there is no spread to estimate from).
        n: the number of values.
    """

    mean: float
    std: float
    ci_low: float
    ci_high: float
    n: int


def summarize(values: Iterable[float], *, confidence: float = 0.95) -> Summary:
    """Summarize values over runs (seeds, folds) with a two-sided Student-t interval (n - 1 degrees of freedom).

    Args:
        values: one metric per seed.
        confidence: the interval's coverage.
    """
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        raise ValueError("summarize needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return Summary(mean, 0.0, mean, mean, 1)
    std = float(x.std(ddof=1))
    if std == 0.0:  # scipy's interval is NaN for a zero scale
        return Summary(mean, 0.0, mean, mean, int(x.size))
    low, high = stats.t.interval(confidence, x.size - 1, loc=mean, scale=std / math.sqrt(x.size))
    return Summary(mean, std, float(low), float(high), int(x.size))


def summary_dict(summary: Summary, values: Iterable[float] | None = None) -> dict:
    """A summary as JSON: mean, std, the interval's ends, n (and the values, when given)."""
    out = {"mean": summary.mean, "std": summary.std, "ci_low": summary.ci_low, "ci_high": summary.ci_high,
           "n": summary.n}  # fmt: skip
    if values is not None:
        out["values"] = list(values)
    return out


def summarize_metrics(values: Iterable[dict]) -> dict[str, Summary]:
    """Per metric, the summary over several runs' metric dicts (the metrics every run reports)."""
    values = list(values)
    if not values:
        return {}
    names = [k for k in values[0] if all(isinstance(v.get(k), (int, float)) for v in values)]
    return {k: summarize(float(v[k]) for v in values) for k in names}


def summarize_reports(reports: list[dict]) -> dict:
    """The mean and interval over runs (folds) of evaluation reports (``EvalReport.to_dict``):
    the all-modality metrics, each modality subset's and each noise row's, matched by
    modalities and by (noisy modality, level)."""

    def rows(key: str, ident) -> list[dict]:
        first = reports[0].get(key) or []
        out = []
        for row in first:
            matched = [next((r for r in rep.get(key) or [] if ident(r) == ident(row)), None) for rep in reports]
            if any(m is None for m in matched):
                continue
            stats = summarize_metrics(m["metrics"] for m in matched)
            out.append({**{k: v for k, v in row.items() if k not in ("metrics", "samples")},
                        "samples": sum(m["samples"] for m in matched),
                        "metrics": {k: summary_dict(s) for k, s in stats.items()}})  # fmt: skip
        return out

    metrics = summarize_metrics(r["metrics"] for r in reports)
    return {
        "runs": len(reports),
        "metric": reports[0].get("metric"),
        "samples": sum(r["samples"] for r in reports),
        "metrics": {k: summary_dict(s, [r["metrics"][k] for r in reports]) for k, s in metrics.items()},
        "subsets": rows("subsets", lambda r: tuple(r["modalities"])),
        "noise": rows("noise", lambda r: (r["noisy"], r["level"])),
    }
