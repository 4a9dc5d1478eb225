"""Text, learned: a subword tokenizer trained on the task's training split, then embeddings.

The tokenizer is Hugging Face ``tokenizers``' byte-pair encoding (lowercased, split on
whitespace and punctuation), trained by ``fit`` on the training texts only, so no
validation or test text shapes the vocabulary. Its JSON travels in the module's state
(``get_extra_state``) so a saved model tokenizes exactly as it did in training.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from modalmoe.encoders.base import Encoder, encoders, sinusoidal_positions

SPECIALS = ("[PAD]", "[UNK]")


@encoders.register("text_learned")
class LearnedTextEncoder(Encoder):
    """list of B strings -> [B, N, D] subword embeddings with sinusoidal positions.

    Args:
        spec: ``ModalitySpec`` of kind text.
        dim: token width D.
        vocab_size: the tokenizer's maximum vocabulary (embeddings are allocated for it).
        max_tokens: texts are truncated to this many subwords.
    """

    def __init__(self, *, spec, dim: int, vocab_size: int = 8000, max_tokens: int = 128) -> None:
        super().__init__(spec=spec, dim=dim)
        self.vocab_size, self.max_tokens = vocab_size, max_tokens
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=dim**-0.5)
        self.tokenizer = None

    def fit(self, x: list[str], present: Tensor, mask: Tensor | None = None) -> None:
        """Train the tokenizer on the present training texts."""
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(vocab_size=self.vocab_size, special_tokens=list(SPECIALS), show_progress=False)
        texts = [t for t, p in zip(x, present.tolist(), strict=True) if p]
        if not texts:
            raise ValueError(f"text modality {self.spec.name!r}: no training text to fit the tokenizer on")
        tokenizer.train_from_iterator(texts, trainer=trainer)
        self.tokenizer = tokenizer

    def get_extra_state(self) -> dict:
        return {"tokenizer": None if self.tokenizer is None else self.tokenizer.to_str()}

    def set_extra_state(self, state: dict) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = None if state.get("tokenizer") is None else Tokenizer.from_str(state["tokenizer"])

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Strings -> ([P, N] ids, [P, N] mask); an empty text becomes one [UNK] token."""
        if self.tokenizer is None:
            raise RuntimeError(
                f"text modality {self.spec.name!r}: the tokenizer is not trained; call "
                "encoder.fit(train_texts, present) (the model does this from the training split)"
            )
        ids = [e.ids[: self.max_tokens] or [1] for e in self.tokenizer.encode_batch(list(texts))]
        length = max(len(i) for i in ids) if ids else 1
        out = torch.zeros(len(ids), length, dtype=torch.long)
        for row, i in enumerate(ids):
            out[row, : len(i)] = torch.tensor(i)
        return out, out != 0

    def embed(self, x: list[str], mask: Tensor | None) -> tuple[Tensor, Tensor]:
        ids, token_mask = self.encode(x)
        ids, token_mask = ids.to(self.embedding.weight.device), token_mask.to(self.embedding.weight.device)
        tokens = self.embedding(ids) + sinusoidal_positions(ids.shape[1], self.dim, device=ids.device)
        return tokens, token_mask
