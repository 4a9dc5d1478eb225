"""The multimodal model: trunk blocks, fusion, heads, missing-modality strategies, presets."""

# Encoders that hold MoE layers (they need both floors below): registered in ``encoders``.
from modalmoe.model import text_minilm_moe  # noqa: E402,F401,I001  (registration)
from modalmoe.model.blocks import Block, Trunk, TrunkOutput, TrunkShape
from modalmoe.model.fusion import Fusion, FusionOutput, fusions
from modalmoe.model.heads import EmbeddingHead, Head
from modalmoe.model.missing import MissingBank, modality_dropout
from modalmoe.model.multimodal import ModelOutput, MultimodalModel, build_model

__all__ = [
    "Block",
    "EmbeddingHead",
    "Fusion",
    "FusionOutput",
    "Head",
    "MissingBank",
    "ModelOutput",
    "MultimodalModel",
    "Trunk",
    "TrunkOutput",
    "TrunkShape",
    "build_model",
    "fusions",
    "modality_dropout",
]
