"""Contrastive alignment of modalities: symmetric InfoNCE with a learned temperature.

CLIP (Radford et al. 2021): for N samples carrying both modalities a and b, the N x N
cosine similarities of their embeddings, scaled by a learned ``exp(logit_scale)``, are
classified in both directions (a -> b over columns, b -> a over rows) with the matching
sample as the target. The scale starts at 1 / 0.07 and is clipped at 100 so training
stays stable.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modalmoe.data.batch import MultimodalBatch
from modalmoe.model.multimodal import ModelOutput
from modalmoe.objectives.base import Objective, has_data, objectives, select_rows, unwrap, zero_loss


@objectives.register("infonce")
class InfoNCE(Objective):
    """Symmetric InfoNCE between modality pairs; one term per pair, named ``"<a>-<b>"``.

    Only samples carrying both modalities of a pair take part; a pair with fewer than two
    such samples in the batch contributes 0 (there is no negative to contrast with).

    Args:
        pairs: ``[[a, b], ...]`` modality pairs (None: every pair of the model's modalities).
        unimodal: embed each modality in its own forward pass, ``model(batch, modalities=[a])``,
            so early fusion cannot leak the other modality into an embedding (as CLIP's
            separate towers); costs one extra pass per modality. False reads
            ``output.embeddings`` (fused towers, no extra pass).
        temperature: initial temperature (CLIP: 0.07).
        max_scale: the largest logit scale (CLIP: 100).
    """

    def __init__(
        self,
        *,
        pairs: Sequence[Sequence[str]] | None = None,
        unimodal: bool = True,
        temperature: float = 0.07,
        max_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if pairs is not None:
            pairs = [tuple(p) for p in pairs]
            bad = [list(p) for p in pairs if len(p) != 2 or p[0] == p[1]]
            if bad or not pairs:
                raise ValueError(f"infonce pairs must be a non-empty list of two different modalities, got {bad}")
        if temperature <= 0 or max_scale <= 0:
            raise ValueError(f"temperature and max_scale must be > 0, got {temperature} and {max_scale}")
        self.pairs, self.unimodal, self.max_log_scale = pairs, unimodal, math.log(max_scale)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def resolve_pairs(self, modalities: list[str]) -> list[tuple[str, str]]:
        pairs = self.pairs if self.pairs is not None else list(itertools.combinations(modalities, 2))
        if not pairs:
            raise ValueError(f"infonce needs at least two modalities; this model has {modalities}")
        unknown = sorted({m for p in pairs for m in p} - set(modalities))
        if unknown:
            raise ValueError(f"infonce pairs name unknown modalities {unknown}; this model has {modalities}")
        return pairs

    def embed(self, output: ModelOutput, batch: MultimodalBatch, model, pairs) -> tuple[dict, dict]:
        """name -> [B, E] embeddings and name -> [B] which rows have one, for every paired modality."""
        names = unwrap(model).modalities
        if not self.unimodal:
            if output.embeddings is None:
                raise ValueError("infonce with unimodal=False needs output.embeddings")
            have = has_data(output)
            return output.embeddings, {m: have[:, names.index(m)] for m in names}
        present = {m: batch.present[m].to(output.fused.device) for m in names}
        needed = {m: torch.zeros_like(present[m]) for m in names}
        for a, b in pairs:  # encode a modality only for rows where some pair can use it
            both = present[a] & present[b]
            needed[a], needed[b] = needed[a] | both, needed[b] | both
        embeddings = {}
        for m in [m for m in names if any(m in p for p in pairs)]:  # a fixed order: a fixed RNG use
            rows = needed[m].nonzero().squeeze(1)
            z = output.fused.new_zeros(len(batch), unwrap(model).embedding_head.proj[m].out_features)
            if rows.numel():
                z = z.index_copy(0, rows, model(select_rows(batch, rows), modalities=[m]).embeddings[m])
            embeddings[m] = z
        return embeddings, needed

    def forward(self, output: ModelOutput, batch: MultimodalBatch, model) -> dict[str, Tensor]:
        net = unwrap(model)
        if net.embedding_head is None:
            raise ValueError("infonce needs the model's embedding head: set model.head.embed_dim (e.g. 64)")
        pairs = self.resolve_pairs(net.modalities)
        embeddings, have = self.embed(output, batch, model, pairs)
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp()
        terms = {}
        for a, b in pairs:
            both = (have[a] & have[b]).nonzero().squeeze(1)
            if both.numel() < 2:
                terms[f"{a}-{b}"] = zero_loss(self)
                continue
            logits = scale * embeddings[a][both] @ embeddings[b][both].T  # [N, N]
            labels = torch.arange(both.numel(), device=logits.device)
            terms[f"{a}-{b}"] = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return terms
