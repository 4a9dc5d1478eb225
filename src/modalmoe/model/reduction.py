"""Token reduction inside a trunk's forward pass: the part a ``Trunk`` receives
(``Trunk(reduction=...)``, the ``TokenReducer`` interface) and the methods that implement it,
merging (ToMe) and top-k pruning, per modality.

After chosen trunk blocks, each modality's real tokens are cut to ``ceil(keep * n)`` (at
least 1 per present modality), so the later blocks' attention and FFNs run on fewer tokens:
the tensors really shrink (kept tokens gathered to the front of each row, re-padded to the
longest row in the batch), and ``modalmoe.efficiency.flops.measure_cost`` sees fewer FLOPs.

- ``merge``: bipartite soft matching (Bolya et al. 2023, "Token Merging: Your ViT But
  Faster"). A modality's tokens alternate into sets A and B; each A token finds its most
  similar B token (cosine similarity of the block's attention keys, averaged over heads, or
  of the tokens); the ``r`` most similar edges are merged by a size-weighted average and the
  sizes add up. One round removes at most half a modality's tokens; a smaller ``keep`` runs
  more rounds. Proportional attention (ToMe's ``log s`` added to the attention logits) lets a
  merged token weigh as much as the tokens it stands for.
- ``attention``: keep the tokens that receive the most attention in the block (mean over
  heads and real queries of its attention probabilities; only reducing blocks compute them
  explicitly, the others keep the fused SDPA kernel).
- ``router``: keep the tokens whose router is most confident (max router probability) in
  the block's MoE layer.

Tokens only merge with, or compete against, tokens of their own modality, and padding (or an
absent modality) never takes part. Each original position remembers which current token
represents it, so the trunk's output is "unmerged" back to the original positions (ToMe's
recipe for dense prediction): a merged token's state is copied to every position it absorbed,
and a pruned position comes back masked out (``TrunkOutput.mask``). Mean pooling over the
unmerged positions is then exactly the size-weighted mean of the merged tokens.

The reduction runs inside a trunk's forward pass, so it is a model part: ``build_model``
builds it from ``model.token_reduction`` (``build_token_reduction``) and hands it to the
fusion; ``modalmoe.efficiency.tokens.apply_token_reduction`` switches it on in a trained
model (``modalmoe compress --method tokens``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalmoe.config import TokenReductionConfig
from modalmoe.moe import MoELayer
from modalmoe.moe.types import RoutingRecord

METHODS = ("none", "merge", "attention", "router")
#: Fusions whose trunks can run on reduced tokens. Bottleneck and cross fusion exchange
#: information between streams position by position every layer, so they do not.
SUPPORTED_FUSIONS = ("early", "late")
BEFORE_FIRST_BLOCK = -1


@dataclass
class BlockStats:
    """What a block reports for token reduction.

    Attributes:
        keys: [B, N, D/heads] its attention keys, mean over heads (ToMe's merge metric).
        received: [B, N] attention each token received (mean over heads and real queries),
            or None unless asked for.
    """

    keys: Tensor
    received: Tensor | None = None


@dataclass
class TokenState:
    """Tokens inside a trunk while they are being reduced.

    Attributes:
        x: [B, N, D] current tokens (zero on padding).
        mask: [B, N] real tokens.
        modality: [B, N] modality id per token.
        sample: [B, N] sample id per token.
        size: [B, N] how many original tokens each stands for (0 on padding).
        source: [B, N0] for each original position, the index of the current token that
            represents it; -1 for padding and pruned positions.
    """

    x: Tensor
    mask: Tensor
    modality: Tensor
    sample: Tensor
    size: Tensor
    source: Tensor

    @property
    def merged(self) -> bool:
        """Whether some token stands for more than one original token."""
        return bool((self.size > 1).any())


def start(x: Tensor, mask: Tensor, modality: Tensor, sample: Tensor) -> TokenState:
    """The state of unreduced tokens: x [B, N, D], mask/modality/sample [B, N]."""
    positions = torch.arange(x.shape[1], device=x.device).expand_as(mask)
    return TokenState(x, mask, modality, sample, mask.to(x.dtype), torch.where(mask, positions, -1))


def target_counts(state: TokenState, keep: Tensor) -> Tensor:
    """[B, M] tokens each modality keeps: ``ceil(keep[m] * n)``, at least 1 where present.

    Args:
        keep: [M] fraction kept per modality id.
    """
    counts = modality_counts(state.mask, state.modality, keep.shape[0]).to(keep.dtype)
    # A hair below the product absorbs float error (0.5 * 9 tokens keeps 5, never 6).
    kept = torch.ceil(counts * keep - 1e-6).clamp_min(1.0)
    return torch.where(counts > 0, torch.minimum(kept, counts), counts).long()


def modality_counts(mask: Tensor, modality: Tensor, num_modalities: int) -> Tensor:
    """[B, M] real tokens of each modality per row."""
    onehot = F.one_hot(modality.clamp(0, num_modalities - 1), num_modalities).bool() & mask.unsqueeze(-1)
    return onehot.sum(1)


def compact(state: TokenState, keep: Tensor, into: Tensor | None = None) -> TokenState:
    """Keep only the tokens marked ``keep``, gathered to the front of each row (order
    preserved) and re-padded to the longest row.

    Args:
        keep: [B, N] tokens that stay (a subset of ``state.mask``).
        into: [B, N] the token that now represents each token (itself, or the token it was
            merged into); None: every token represents itself (pruning).
    """
    b, n = keep.shape
    width = max(int(keep.sum(1).max()), 1)
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # kept first
    new_index = torch.where(keep, keep.long().cumsum(1) - 1, -1)  # [B, N] position after compaction
    if into is not None:
        new_index = new_index.gather(1, into)
    mask = keep.gather(1, order)
    x = state.x.gather(1, order.unsqueeze(-1).expand(-1, -1, state.x.shape[-1])) * mask.unsqueeze(-1)
    source = torch.where(state.source >= 0, new_index.gather(1, state.source.clamp_min(0)), -1)
    return TokenState(
        x=x,
        mask=mask,
        modality=state.modality.gather(1, order),
        sample=state.sample.gather(1, order),
        size=state.size.gather(1, order) * mask,
        source=source,
    )


def _rank_within_modality(score: Tensor, eligible: Tensor, modality: Tensor, num_modalities: int) -> Tensor:
    """[B, N] each eligible token's rank (0 = highest score) among the eligible tokens of its
    modality in its row; ineligible tokens get N."""
    n = score.shape[1]
    rank = torch.full_like(modality, n)
    for m in range(num_modalities):
        chosen = eligible & (modality == m)
        if not bool(chosen.any()):
            continue
        ordered = torch.where(chosen, score, -math.inf).argsort(dim=1, descending=True, stable=True)
        ranks = torch.empty_like(ordered).scatter_(1, ordered, torch.arange(n, device=score.device).expand_as(ordered))
        rank = torch.where(chosen, ranks, rank)
    return rank


def prune(state: TokenState, score: Tensor, keep: Tensor) -> TokenState:
    """Keep each modality's top-``ceil(keep * n)`` tokens by ``score`` ([B, N], higher is kept)."""
    target = target_counts(state, keep)
    rank = _rank_within_modality(score, state.mask, state.modality, keep.shape[0])
    wanted = target.gather(1, state.modality.clamp(0, keep.shape[0] - 1))
    return compact(state, state.mask & (rank < wanted))


def bipartite_merge(state: TokenState, metric: Tensor, remove: Tensor) -> TokenState:
    """One round of ToMe's bipartite soft matching, per modality.

    Args:
        state: the tokens (anything carried in ``x``, such as the metric, is merged alike).
        metric: [B, N, C] what similarity is measured on (keys or tokens).
        remove: [B, M] tokens each modality should lose; one round removes at most the
            modality's A tokens (about half), so ``merge`` runs rounds.
    """
    mask, modality, num = state.mask, state.modality, remove.shape[1]
    onehot = F.one_hot(modality.clamp(0, num - 1), num).bool() & mask.unsqueeze(-1)
    order = ((onehot.long().cumsum(1) * onehot).sum(-1) - 1).clamp_min(0)  # index within its modality
    a, b = mask & (order % 2 == 0), mask & (order % 2 == 1)  # ToMe alternates tokens into A and B
    unit = F.normalize(metric.float(), dim=-1)
    allowed = a.unsqueeze(2) & b.unsqueeze(1) & (modality.unsqueeze(2) == modality.unsqueeze(1))
    best, partner = (unit @ unit.transpose(1, 2)).masked_fill(~allowed, -math.inf).max(-1)
    eligible = a & torch.isfinite(best)  # an A token with a B token of its modality to go to
    rank = _rank_within_modality(best, eligible, modality, num)
    merged = eligible & (rank < remove.gather(1, modality.clamp(0, num - 1)))

    # Each B token becomes the size-weighted average of itself and the A tokens merged into it.
    size = state.size.unsqueeze(-1).to(state.x.dtype)
    moved = state.x * size * merged.unsqueeze(-1)
    total = (state.x * size).scatter_add(1, partner.unsqueeze(-1).expand_as(moved), moved)
    new_size = state.size.scatter_add(1, partner, state.size * merged)
    received = new_size > state.size
    x = torch.where(received.unsqueeze(-1), total / new_size.clamp_min(1e-6).unsqueeze(-1), state.x)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    into = torch.where(merged, partner, positions)
    return compact(replace(state, x=x, size=new_size), mask & ~merged, into)


def merge(state: TokenState, metric: Tensor, keep: Tensor) -> TokenState:
    """Merge each modality's tokens down to ``ceil(keep * n)`` (rounds of bipartite matching;
    the metric is merged along with the tokens for the next round).

    Args:
        metric: [B, N, C] similarity features (the block's keys, or the tokens).
        keep: [M] fraction kept per modality id.
    """
    target = target_counts(state, keep)
    dim = state.x.shape[-1]
    work = replace(state, x=torch.cat([state.x, metric.to(state.x.dtype)], -1))
    while True:
        remove = modality_counts(work.mask, work.modality, keep.shape[0]) - target
        if not bool((remove > 0).any()):
            break
        before = int(work.mask.sum())
        work = bipartite_merge(work, work.x[..., dim:], remove.clamp_min(0))
        if int(work.mask.sum()) == before:  # nothing left to match (cannot happen with n >= 2)
            break
    return replace(work, x=work.x[..., :dim])


def unmerge(state: TokenState, x: Tensor) -> tuple[Tensor, Tensor]:
    """x: [B, N, D] current tokens -> ([B, N0, D] at the original positions, [B, N0] which
    positions carry a state). A merged token fills every position it absorbed; pruned and
    padding positions are 0 and masked out."""
    carried = state.source >= 0
    index = state.source.clamp_min(0).unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return x.gather(1, index) * carried.unsqueeze(-1), carried


class TokenReducer(Protocol):
    """What a ``Trunk`` asks of the token reduction part it is given.

    A reducer holds no parameters and no state: a pass's tokens travel in a ``TokenState``
    that the trunk threads through its blocks. For each forward pass the trunk calls:

    1. ``state = reduce(start(x, mask, modality, sample), -1)`` on its input (x: [B, N, D];
       mask, modality, sample: [B, N]);
    2. for each block ``i``: runs the block on ``state``'s tokens, adding ``bias(state)``
       ([B, N'] sizes, or None) to its attention logits and computing the attention
       probabilities explicitly when ``needs_attention(i)``; then
       ``state = reduce(state, i, stats=..., record=...)`` on the block's output, or, when
       ``inside(i)``, ``reduce(state, i, stats=...)`` on the tokens after the block's
       attention and before its FFN (which then runs on the reduced tokens);
    3. ``restore(state, x)``: the final tokens [B, N', D] back at the original positions
       [B, N, D], with [B, N] which positions carry a state.
    """

    @property
    def active(self) -> bool:
        """Whether this reducer can remove anything (False: the trunk runs as without one)."""
        ...

    def check(self, blocks: Sequence[nn.Module]) -> None:
        """Raise ``ValueError`` if it cannot run on these blocks (the trunk's, in order)."""
        ...

    def start(self, x: Tensor, mask: Tensor, modality: Tensor, sample: Tensor) -> TokenState:
        """The unreduced state of the trunk's input."""
        ...

    def bias(self, state: TokenState) -> Tensor | None:
        """[B, N'] token sizes for proportional attention, or None."""
        ...

    def needs_attention(self, layer: int) -> bool:
        """Whether block ``layer`` must report the attention each token received."""
        ...

    def inside(self, layer: int) -> bool:
        """Whether block ``layer`` reduces between its attention and its FFN."""
        ...

    def reduce(
        self, state: TokenState, layer: int, *, stats: BlockStats | None = None, record: RoutingRecord | None = None
    ) -> TokenState:
        """The state after reducing at ``layer`` (-1: before the first block); ``state``
        unchanged where ``layer`` does not reduce. ``stats``: the block's; ``record``: its
        MoE layer's routing record (None for a dense block, or inside the block)."""
        ...

    def restore(self, state: TokenState, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: [B, N', D] -> ([B, N, D] at the original positions, [B, N] which carry a state)."""
        ...


class TokenReduction:
    """The ``TokenReducer`` of ``model.token_reduction``: merging or pruning after (or inside)
    chosen blocks; the trunk holds it (no parameters, no state).

    Args:
        method: ``merge``, ``attention`` or ``router`` (``none`` reduces nothing).
        layers: 0-based blocks after which tokens are reduced; -1 is before the first block
            (``merge`` only: it measures similarity on the tokens themselves).
        keep: [M] fraction of each modality's tokens kept at each reducing layer, by modality id.
        proportional_attention: ``merge``: add ``log(size)`` to the attention logits of later blocks.
        metric: ``merge``: ``keys`` (the block's attention keys, mean over heads; ToMe) or
            ``tokens`` (the block's output tokens).
        placement: ``after_block`` or ``before_ffn`` (inside the block, between its attention
            and its FFN, as ToMe does; not for ``router``).
    """

    def __init__(
        self,
        *,
        method: str,
        layers: Sequence[int],
        keep: Sequence[float],
        proportional_attention: bool = True,
        metric: str = "keys",
        placement: str = "after_block",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown token reduction method {method!r}; choose from {METHODS}")
        if metric not in ("keys", "tokens"):
            raise ValueError(f"unknown merge metric {metric!r}; choose 'keys' or 'tokens'")
        if any(not 0.0 < k <= 1.0 for k in keep):
            raise ValueError(f"keep fractions must be in (0, 1], got {list(keep)}")
        if BEFORE_FIRST_BLOCK in layers and method in ("attention", "router"):
            raise ValueError(
                f"layer -1 (before the first block) works only with method 'merge': {method!r} "
                "scores come from a block; use layers >= 0"
            )
        self.method, self.layers, self.metric = method, tuple(sorted(set(layers))), metric
        self.keep = tuple(float(k) for k in keep)
        self.proportional_attention = proportional_attention
        if placement not in ("after_block", "before_ffn"):
            raise ValueError(f"unknown placement {placement!r}; choose 'after_block' or 'before_ffn'")
        if placement == "before_ffn" and method == "router":
            raise ValueError("placement 'before_ffn' has no router score yet: use 'after_block' with 'router'")
        self.placement = placement

    def check(self, blocks: Sequence[nn.Module]) -> None:
        """Refuse layers out of range for these blocks, and ``router`` on dense blocks."""
        depth = len(blocks)
        bad = [layer for layer in self.layers if not BEFORE_FIRST_BLOCK <= layer < depth]
        if bad:
            raise ValueError(
                f"token_reduction.layers {bad} out of range for depth={depth}: use 0..{depth - 1} "
                "(after that block) or -1 (before the first block)"
            )
        if self.method == "router":
            dense = [layer for layer in self.layers if not isinstance(blocks[layer].ffn, MoELayer)]
            if dense:
                raise ValueError(
                    f"token reduction by router score needs MoE blocks, but blocks {dense} are dense; "
                    "use 'attention' or 'merge' there"
                )

    def inside(self, layer: int) -> bool:
        """Whether block ``layer`` reduces between its attention and its FFN."""
        return self.active and self.placement == "before_ffn" and layer in self.layers and layer >= 0

    @property
    def active(self) -> bool:
        """Whether anything can be removed (``none``, or keep 1.0 everywhere, is a no-op)."""
        return self.method != "none" and bool(self.layers) and min(self.keep) < 1.0

    def needs_attention(self, layer: int) -> bool:
        """Whether block ``layer`` must compute its attention probabilities explicitly."""
        return self.active and self.method == "attention" and layer in self.layers

    def bias(self, state: TokenState) -> Tensor | None:
        """[B, N] sizes for proportional attention, or None (no merged token, or switched off)."""
        if self.method == "merge" and self.proportional_attention and state.merged:
            return state.size
        return None

    def start(self, x: Tensor, mask: Tensor, modality: Tensor, sample: Tensor) -> TokenState:
        """The unreduced state of a trunk's input (see ``start``)."""
        return start(x, mask, modality, sample)

    def restore(self, state: TokenState, x: Tensor) -> tuple[Tensor, Tensor]:
        """The trunk's output at the original positions and which carry a state (``unmerge``)."""
        return unmerge(state, x)

    def reduce(
        self, state: TokenState, layer: int, *, stats: BlockStats | None = None, record: RoutingRecord | None = None
    ) -> TokenState:
        """Reduce after block ``layer`` (-1: before the first), if it is a reducing layer.

        Args:
            state: the tokens, ``x`` being the block's output.
            stats: the block's ``BlockStats`` (keys for ``merge``, received attention for
                ``attention``); None before the first block.
            record: the block's routing record (``router``); None for a dense block.
        """
        if not self.active or layer not in self.layers:
            return state
        keep = torch.tensor(self.keep, device=state.x.device)
        if self.method == "merge":
            use_keys = self.metric == "keys" and stats is not None
            return merge(state, stats.keys if use_keys else state.x, keep)
        if self.method == "attention":
            return prune(state, stats.received, keep)
        if record is None:
            raise ValueError(
                f"token reduction by router score after block {layer}, which is a dense block: choose MoE "
                "blocks for `layers` (block i is MoE when (i + 1) % moe.every == 0), or use 'attention' or 'merge'"
            )
        return prune(state, router_confidence(record, state.mask), keep)

    def __repr__(self) -> str:
        return (
            f"TokenReduction(method={self.method!r}, layers={list(self.layers)}, keep={list(self.keep)}, "
            f"proportional_attention={self.proportional_attention}, metric={self.metric!r}, "
            f"placement={self.placement!r})"
        )


def router_confidence(record: RoutingRecord, mask: Tensor) -> Tensor:
    """[B, N] each real token's max router probability (0 on padding), from a routing record
    of the tokens ``mask`` marks (the MoE layer routes them in row-major order)."""
    top = record.probs.detach().max(-1).values
    flat = torch.zeros(mask.numel(), dtype=top.dtype, device=top.device)
    return flat.index_copy(0, mask.reshape(-1).nonzero().squeeze(1), top).view_as(mask)


def build_token_reduction(config: TokenReductionConfig, modalities: Sequence[str]) -> TokenReduction | None:
    """A ``TokenReduction`` from a ``TokenReductionConfig`` for these modality names (in id
    order), or None when ``method`` is ``none``."""
    if config.method == "none":
        return None
    keep = config.keep
    if isinstance(keep, Mapping):
        unknown = sorted(set(keep) - set(modalities))
        if unknown:
            raise ValueError(
                f"token_reduction.keep names unknown modalities {unknown}; this model has {list(modalities)}"
            )
        fractions = [float(keep.get(m, 1.0)) for m in modalities]
    else:
        fractions = [float(keep)] * len(modalities)
    return TokenReduction(
        method=config.method,
        layers=config.layers,
        keep=fractions,
        proportional_attention=config.proportional_attention,
        metric=config.metric,
        placement=config.placement,
    )
