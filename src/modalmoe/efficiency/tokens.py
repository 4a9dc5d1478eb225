"""Token reduction of a built or trained model (``modalmoe compress --method tokens``):
merging (ToMe) and top-k pruning, per modality, switched on without retraining.

    model = load_run_model("runs/designs/av-digits/token-choice-s0")
    apply_token_reduction(model, method="merge", keep=0.5, layers=[0])

The reduction itself runs inside the trunk's forward pass, so it is a model part and lives in
``modalmoe.model.reduction`` (how it works is described there); its names stay importable
from here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from modalmoe.config import ModelConfig, TokenReductionConfig, validate
from modalmoe.model.reduction import (
    BEFORE_FIRST_BLOCK,
    METHODS,
    SUPPORTED_FUSIONS,
    BlockStats,
    TokenReducer,
    TokenReduction,
    TokenState,
    bipartite_merge,
    build_token_reduction,
    compact,
    merge,
    modality_counts,
    prune,
    router_confidence,
    start,
    target_counts,
    unmerge,
)

__all__ = [
    "BEFORE_FIRST_BLOCK",
    "METHODS",
    "SUPPORTED_FUSIONS",
    "BlockStats",
    "TokenReducer",
    "TokenReduction",
    "TokenState",
    "apply_token_reduction",
    "bipartite_merge",
    "build_token_reduction",
    "compact",
    "configure",
    "merge",
    "modality_counts",
    "prune",
    "router_confidence",
    "start",
    "target_counts",
    "unmerge",
]


def configure(fusion: nn.Module, config: TokenReductionConfig) -> None:
    """Hand every trunk of ``fusion`` the token reduction ``config`` describes (``method:
    none``: take it away). Fusions other than early and late refuse a reduction."""
    fusion.set_reduction(build_token_reduction(config, fusion.modalities))


def apply_token_reduction(
    model: nn.Module,
    *,
    method: str,
    keep: float | Mapping[str, float] = 0.5,
    layers: Sequence[int] = (0,),
    proportional_attention: bool = True,
    metric: str = "keys",
    placement: str = "after_block",
) -> nn.Module:
    """Switch token reduction on (or off, ``method="none"``) in a built or trained model.

    Training-free, as in ToMe. ``model.config.token_reduction`` is updated, so saving the
    model's config reproduces the reduction.

    Args:
        model: a ``MultimodalModel`` with an ``early`` or ``late`` fusion.
        method, keep, layers, proportional_attention, metric, placement: see
            ``TokenReductionConfig``.

    Returns:
        the same model.
    """
    settings = {
        "method": method,
        "keep": dict(keep) if isinstance(keep, Mapping) else keep,
        "layers": list(layers),
        "proportional_attention": proportional_attention,
        "metric": metric,
        "placement": placement,
    }
    config = getattr(model, "config", None)
    if config is not None:
        data = config.model_dump(mode="json")
        data["token_reduction"] = settings
        config = validate(data, ModelConfig, source="for apply_token_reduction")
        reduction = config.token_reduction
    else:
        reduction = validate(settings, TokenReductionConfig, source="for apply_token_reduction")
    configure(model.fusion, reduction)
    if config is not None:
        model.config = config
    return model
