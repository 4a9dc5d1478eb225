"""The MoE engine: routers, expert bank, dispatch, layer and auxiliary losses."""

from modalmoe.moe.dispatch import DispatchPlan, expert_capacity, plan_dispatch
from modalmoe.moe.experts import ExpertBank, FeedForward, GroupedLayout, grouped_ffn
from modalmoe.moe.layer import MoELayer, build_moe_layer
from modalmoe.moe.routers import Router, routers
from modalmoe.moe.types import MoEOutput, Routing, RoutingRecord, SoftSlots

__all__ = [
    "DispatchPlan",
    "ExpertBank",
    "FeedForward",
    "GroupedLayout",
    "MoELayer",
    "MoEOutput",
    "Router",
    "Routing",
    "RoutingRecord",
    "SoftSlots",
    "expert_capacity",
    "build_moe_layer",
    "grouped_ffn",
    "plan_dispatch",
    "routers",
]
