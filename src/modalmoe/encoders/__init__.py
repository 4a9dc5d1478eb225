"""Modality encoders: one file per kind of modality, each turning ``[B, ...]`` into tokens.

Contract: ``encoder(x [B, ...], present [B], mask=None) -> Tokens(x [B, N, D], mask [B, N])``.
A sample that lacks the modality gets no tokens (its mask row is all False) and its input
row is never read, so changing the data of an absent modality cannot change any output.
Every encoder adds a learned modality embedding, so the trunk can tell modalities apart.

    from modalmoe.encoders import build_encoder
    enc = build_encoder(task.specs["audio"], dim=64)
    minilm = encoders.create("text_minilm", spec=task.specs["text"], dim=64)  # frozen, pretrained
"""

from modalmoe.encoders import image, sequence, tabular, text, text_pretrained, vector  # noqa: E402,F401,I001  (registration)
from modalmoe.encoders import image_pretrained  # noqa: E402,F401,I001  (registration)
from modalmoe.encoders.base import Encoder, Tokens, encoders, sinusoidal_positions


def build_encoder(spec, *, dim: int, **options) -> Encoder:
    """The registered encoder for ``spec.kind`` (``text`` -> the learned subword encoder).

    Args:
        spec: a ``modalmoe.data.ModalitySpec``.
        dim: token width D.
        options: the encoder's own arguments (``patch=``, ``tokens=``, ...).
    """
    name = "text_learned" if spec.kind == "text" else spec.kind
    return encoders.create(name, spec=spec, dim=dim, **options)


__all__ = ["Encoder", "Tokens", "build_encoder", "encoders", "sinusoidal_positions"]
