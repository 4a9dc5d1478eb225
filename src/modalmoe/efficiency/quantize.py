"""Int8 quantization of a trained model (``modalmoe compress --method int8``).

The int8 layers themselves (``Int8Linear``, ``Int8PatchConv``, ``Int8ExpertBank``) run inside a
model's forward pass, so they are model parts and live in ``modalmoe.model.quantized``, where
``build_model`` rebuilds a quantized run's structure from its config. This module is the
efficiency room's entry point to them: quantizing a float model and measuring it.
"""

from modalmoe.model.quantized import (
    MIN_WEIGHT,
    Int8ExpertBank,
    Int8Linear,
    Int8PatchConv,
    int8_matmul,
    int8_structure,
    is_quantized,
    quantize_int8,
    quantize_rows,
    quantize_weight,
    quantize_weight_per_expert,
    weight_count,
)

__all__ = [
    "MIN_WEIGHT",
    "Int8ExpertBank",
    "Int8Linear",
    "Int8PatchConv",
    "int8_matmul",
    "int8_structure",
    "is_quantized",
    "quantize_int8",
    "quantize_rows",
    "quantize_weight",
    "quantize_weight_per_expert",
    "weight_count",
]
