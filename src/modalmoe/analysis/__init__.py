"""Analysis: routing statistics over ``RoutingRecord``s (expert load, modality and class
specialisation, entropy, drops, routing shift under missing modalities) and the collapse alarm.

    from modalmoe.analysis import concat_records, expert_modality_counts, mutual_information
    record = concat_records([out.records[0] for out in outputs])
    mi = mutual_information(expert_modality_counts(record, num_modalities=2))
"""

from modalmoe.analysis.routing import (
    CollapseMonitor,
    collapse_status,
    concat_records,
    dominant,
    drop_rate,
    expert_class_counts,
    expert_modality_counts,
    expert_share,
    kept,
    mutual_information,
    normalized_entropy,
    normalized_mutual_information,
    router_entropy,
    routing_shift,
    specialisation,
    tokens_per_expert,
)

__all__ = [
    "CollapseMonitor",
    "collapse_status",
    "concat_records",
    "dominant",
    "drop_rate",
    "expert_class_counts",
    "expert_modality_counts",
    "expert_share",
    "kept",
    "mutual_information",
    "normalized_entropy",
    "normalized_mutual_information",
    "router_entropy",
    "routing_shift",
    "specialisation",
    "tokens_per_expert",
]
