"""The multimodal model: transformer blocks (dense or MoE FFN), fusion, heads, presets."""

from modalmoe.model.blocks import Block, Trunk, TrunkOutput

__all__ = ["Block", "Trunk", "TrunkOutput"]
