"""Tables: one token per feature, as the FT-Transformer's feature tokenizer (Gorishniy et al. 2021)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modalmoe.encoders.base import Encoder, Standardize, encoders


@encoders.register("tabular")
class TabularEncoder(Encoder):
    """[B, F] -> [B, F, D]: numeric column j -> ``x_j * W_j + b_j``; categorical column j ->
    ``E_j[code] + b_j`` (columns and cardinalities from ``spec.categorical``).

    Args:
        spec: ``ModalitySpec`` of kind tabular, shape ``(F,)``.
        dim: token width D.
    """

    def __init__(self, *, spec, dim: int) -> None:
        super().__init__(spec=spec, dim=dim)
        features = spec.shape[0]
        self.categorical = sorted(spec.categorical)
        self.numeric = [j for j in range(features) if j not in spec.categorical]
        self.register_buffer("numeric_index", torch.tensor(self.numeric, dtype=torch.long))
        self.register_buffer("categorical_index", torch.tensor(self.categorical, dtype=torch.long))
        sizes = [spec.categorical[j] for j in self.categorical]
        self.register_buffer("offsets", torch.tensor([0, *sizes[:-1]], dtype=torch.long).cumsum(0))
        self.register_buffer("cardinality", torch.tensor(sizes, dtype=torch.long))
        self.standardize = Standardize(len(self.numeric))
        self.weight = nn.Parameter(torch.randn(len(self.numeric), dim) * dim**-0.5)
        self.embedding = nn.Embedding(max(sum(sizes), 1), dim)
        self.bias = nn.Parameter(torch.zeros(features, dim))
        nn.init.normal_(self.embedding.weight, std=dim**-0.5)

    def fit(self, x: Tensor, present: Tensor, mask: Tensor | None = None) -> None:
        """Numeric column statistics from training data: x [N, F]."""
        if self.numeric:
            self.require_samples(present)
            self.standardize.fit(x[present][:, self.numeric_index])

    def embed(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        tokens = x.new_zeros(x.shape[0], x.shape[1], self.dim)
        if self.numeric:
            values = self.standardize(x[:, self.numeric_index])
            tokens[:, self.numeric_index] = values.unsqueeze(-1) * self.weight
        if self.categorical:
            codes = x[:, self.categorical_index].long()
            if bool(((codes < 0) | (codes >= self.cardinality)).any()):
                raise ValueError(
                    f"tabular modality {self.spec.name!r}: a categorical code is outside 0..cardinality-1 "
                    f"(cardinalities {self.cardinality.tolist()} for columns {self.categorical})"
                )
            tokens[:, self.categorical_index] = self.embedding(codes + self.offsets)
        tokens = tokens + self.bias
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=x.device)
