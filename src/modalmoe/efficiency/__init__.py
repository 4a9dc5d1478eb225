"""Efficiency: FLOP and parameter accounting (profiling, quantization, pruning arrive later)."""

from modalmoe.efficiency.flops import Cost, expert_row_flops, measure_cost

__all__ = ["Cost", "expert_row_flops", "measure_cost"]
