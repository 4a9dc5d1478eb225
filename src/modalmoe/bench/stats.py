"""Statistics over seeds: means with Student-t intervals, paired tests, Holm's correction.

A benchmark cell is one design on one task trained with several seeds. Designs are compared
seed by seed (the same seed gives both the same data order and splits), so the test is a
paired t-test; comparing many designs with one reference is a family of tests, whose p-values
are adjusted with Holm's step-down procedure (Holm 1979, "A simple sequentially rejective
multiple test procedure"), which controls the family-wise error rate like Bonferroni but
rejects at least as often.

    a, b = {0: 0.91, 1: 0.93, 2: 0.92}, {0: 0.89, 1: 0.90, 2: 0.90}   # seed -> accuracy
    summarize(a.values()).ci_low, paired_test(a, b)
    holm({"soft": 0.01, "token-choice": 0.04, "expert-choice": 0.03})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from modalmoe.evaluate.intervals import Summary, summarize

__all__ = ["Summary", "holm", "paired_test", "significance", "summarize"]


def _pairs(a: Mapping[int, float] | Sequence[float], b: Mapping[int, float] | Sequence[float]) -> np.ndarray:
    """[n, 2] paired values: by shared seed for mappings, by position for sequences."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        seeds = sorted(set(a) & set(b))
        return np.array([(a[s], b[s]) for s in seeds], dtype=float).reshape(-1, 2)
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        raise TypeError("pass both results as seed -> value mappings, or both as sequences in seed order")
    if len(a) != len(b):
        raise ValueError(f"paired values need one value per seed on both sides, got {len(a)} and {len(b)}")
    return np.array(list(zip(a, b, strict=True)), dtype=float).reshape(-1, 2)


def paired_test(a: Mapping[int, float] | Sequence[float], b: Mapping[int, float] | Sequence[float]) -> float | None:
    """Two-sided paired t-test p-value (``scipy.stats.ttest_rel``) of ``a`` against ``b``.

    Args:
        a, b: seed -> value mappings (paired on the seeds both have), or sequences in the same
            seed order.

    Returns:
        the p-value; None with fewer than 2 pairs (no test is possible); 1.0 when every
        difference is 0 (no evidence of a difference; scipy would return NaN). Differences
        that are equal but not 0 have no spread and give 0.0.
    """
    pairs = _pairs(a, b)
    if len(pairs) < 2:
        return None
    diff = pairs[:, 0] - pairs[:, 1]
    if not diff.any():
        return 1.0
    if np.all(diff == diff[0]):
        return 0.0  # an exactly constant difference: t is infinite
    return float(stats.ttest_rel(pairs[:, 0], pairs[:, 1]).pvalue)


def holm(pvalues: Mapping[str, float | None]) -> dict[str, float | None]:
    """Holm-Bonferroni adjusted p-values (Holm 1979), in the input's order.

    The i-th smallest of m p-values becomes ``max over j <= i of min(1, (m - j + 1) * p_(j))``
    (1-based), so comparing the adjusted values with alpha is Holm's step-down test. None
    (a test that could not be run) stays None and is not counted in m.
    """
    tested = sorted(((p, k) for k, p in pvalues.items() if p is not None), key=lambda item: item[0])
    m, running, out = len(tested), 0.0, {}
    for i, (p, key) in enumerate(tested):
        running = max(running, min(1.0, (m - i) * p))
        out[key] = running
    return {key: out.get(key) for key in pvalues}


def significance(p: float | None, alpha: float = 0.05) -> bool:
    """Whether ``p`` rejects at level ``alpha`` (``p <= alpha``, as statsmodels' ``multipletests``);
    None (no test) is never significant."""
    return p is not None and p <= alpha
