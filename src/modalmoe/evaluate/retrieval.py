"""Cross-modal retrieval: does modality A's embedding of a sample find the same sample's
modality B embedding among all of B's? (CLIP's zero-shot retrieval evaluation.)

Scores come from torchmetrics' retrieval metrics: every (query, gallery item) pair is one
row with ``indexes`` = the query id, ``preds`` = the cosine similarity and ``target`` =
"this gallery item is the query's own sample". Each query has exactly one relevant item,
so recall@k is the fraction of queries whose match ranks in the top k, and mAP is the mean
reciprocal rank of the match.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def retrieval_metrics(query: Tensor, gallery: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k and mAP of retrieving gallery item ``i`` for query ``i``.

    Memory is quadratic in ``N`` (the full similarity matrix): sub-sample very large splits.

    Args:
        query: [N, E] query embeddings (normalised here; cosine similarity).
        gallery: [N, E] gallery embeddings; row ``i`` is query ``i``'s match.
        ks: cut-offs for recall; a k at or above ``N`` gives recall 1.

    Returns:
        ``{"recall@k": ..., "map": ...}`` as floats.
    """
    if query.dim() != 2 or query.shape != gallery.shape:
        raise ValueError(f"expected query and gallery [N, E], got {tuple(query.shape)} and {tuple(gallery.shape)}")
    # local import: torchmetrics costs ~3 s to import (``metrics.py`` says why that matters)
    from torchmetrics.retrieval import RetrievalMAP, RetrievalRecall

    n = query.shape[0]
    if n == 0:
        raise ValueError("retrieval needs at least one query, got N = 0")
    if any(k < 1 for k in ks):
        raise ValueError(f"recall cut-offs must be >= 1, got {tuple(ks)}")
    query = F.normalize(query.detach().float().cpu(), dim=-1)
    gallery = F.normalize(gallery.detach().float().cpu(), dim=-1)
    similarity = query @ gallery.T  # [N, N]: row = query, column = gallery item
    preds = similarity.flatten()
    target = torch.eye(n, dtype=torch.bool).flatten()
    indexes = torch.arange(n).repeat_interleave(n)
    out = {f"recall@{k}": float(RetrievalRecall(top_k=k)(preds, target, indexes=indexes)) for k in ks}
    out["map"] = float(RetrievalMAP()(preds, target, indexes=indexes))
    return out


def cross_modal_retrieval(
    embeddings: Mapping[str, Tensor],
    present: Mapping[str, Tensor],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[tuple[str, str], dict[str, float]]:
    """Retrieval in both directions between every pair of modalities.

    For each ordered pair ``(a, b)``, ``a`` embeddings query the ``b`` embeddings; only samples
    that carry both modalities take part (query and gallery alike). Pairs without any such
    sample are left out.

    Args:
        embeddings: modality -> [N, E] embeddings.
        present: modality -> bool [N], which samples carry it.
        ks: recall cut-offs.

    Returns:
        ``(a, b)`` -> ``retrieval_metrics`` plus ``"samples"``, the number of samples used.
    """
    out = {}
    for a in embeddings:
        for b in embeddings:
            if a == b:
                continue
            both = (present[a] & present[b]).cpu()
            count = int(both.sum())
            if count == 0:
                continue
            metrics = retrieval_metrics(embeddings[a].cpu()[both], embeddings[b].cpu()[both], ks)
            out[(a, b)] = {"samples": count, **metrics}
    return out
