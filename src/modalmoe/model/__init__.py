"""The multimodal model: trunk blocks, fusion, heads, missing-modality strategies, presets."""

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
