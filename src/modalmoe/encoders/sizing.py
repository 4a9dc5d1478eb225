"""Encoders chosen and sized from a modality's kind and shape, for data no preset knows.

    from modalmoe.encoders.sizing import sized_encoder
    sized_encoder(spec)   # {"name": "image", "options": {"patch": 7}} for a 28x28 image

The rules, the ones the bundled tasks' presets follow by hand:

- ``image`` ``[C, H, W]``: patches as small as possible such that there are at most
  ``IMAGE_TOKENS`` (16) of them; the patch divides both sides (28x28 -> 7, 16 tokens;
  64x64 -> 16, 16 tokens; a side with no fitting divisor gives one patch per image).
- ``sequence`` ``[L, C]``: patches of ``ceil(L / SEQUENCE_TOKENS)`` steps, so at most 20 tokens
  (200 steps -> 10).
- ``vector`` ``[F]``: one token, two from ``VECTOR_SPLIT`` (64) features on.
- ``tabular``: one token per feature (the encoder's own layout), no options.
- ``text``: the learned subword encoder, a 4000-word vocabulary, at most 64 tokens.
"""

from __future__ import annotations

import math

IMAGE_TOKENS = 16
SEQUENCE_TOKENS = 20
VECTOR_SPLIT = 64
TEXT = {"vocab_size": 4000, "max_tokens": 64}


def image_patch(height: int, width: int, tokens: int = IMAGE_TOKENS) -> int:
    """The smallest patch dividing both sides with at most ``tokens`` patches."""
    side = math.gcd(height, width)
    for patch in range(1, side + 1):
        if side % patch == 0 and (height // patch) * (width // patch) <= tokens:
            return patch
    return side


def sized_encoder(spec, *, length: int | None = None) -> dict:
    """``{"name": encoder, "options": {...}}`` for a ``ModalitySpec`` (see the module docstring);
    ``length``: a sequence's longest length, for specs whose length varies (``(None, C)``)."""
    if spec.kind == "image":
        _, height, width = spec.shape
        return {"name": "image", "options": {"patch": image_patch(height, width)}}
    if spec.kind == "sequence":
        steps = spec.shape[0] if spec.shape[0] is not None else length
        if steps is None:
            raise ValueError(f"sequence modality {spec.name!r} varies in length: pass its longest length")
        return {"name": "sequence", "options": {"patch": max(1, math.ceil(steps / SEQUENCE_TOKENS))}}
    if spec.kind == "vector":
        return {"name": "vector", "options": {"tokens": 1 if spec.shape[0] < VECTOR_SPLIT else 2}}
    if spec.kind == "text":
        return {"name": "text_learned", "options": dict(TEXT)}
    return {"name": spec.kind, "options": {}}
