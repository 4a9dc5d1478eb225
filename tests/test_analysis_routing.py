"""Routing statistics on hand-built records with known answers, and the collapse monitor."""

import json
import math

import pytest
import torch

from modalmoe.analysis import (
    CollapseMonitor,
    collapse_status,
    concat_records,
    dominant,
    drop_rate,
    expert_class_counts,
    expert_modality_counts,
    expert_share,
    mutual_information,
    normalized_entropy,
    normalized_mutual_information,
    router_entropy,
    routing_shift,
    specialisation,
    tokens_per_expert,
)
from modalmoe.moe.types import RoutingRecord


def record(
    expert_index,
    *,
    num_experts=4,
    modality=None,
    sample=None,
    weight=None,
    probs=None,
    dropped=None,
    valid=None,
    capacity=None,
) -> RoutingRecord:
    index = torch.tensor(expert_index, dtype=torch.long).view(len(expert_index), -1)
    t, k = index.shape
    return RoutingRecord(
        expert_index=index,
        weight=torch.full((t, k), 1.0 / k) if weight is None else torch.tensor(weight),
        probs=torch.full((t, num_experts), 1.0 / num_experts) if probs is None else probs,
        logits=None,
        modality=torch.zeros(t, dtype=torch.long) if modality is None else torch.tensor(modality),
        sample=torch.arange(t) if sample is None else torch.tensor(sample),
        dropped=torch.zeros(t, k, dtype=torch.bool) if dropped is None else torch.tensor(dropped),
        valid=torch.ones(t, k, dtype=torch.bool) if valid is None else torch.tensor(valid),
        num_experts=num_experts,
        capacity=capacity,
    )


def test_counts_and_shares_skip_invalid_and_dropped_choices():
    r = record(
        [[0, 1], [0, 2], [3, 0]],
        valid=[[True, True], [True, False], [True, True]],
        dropped=[[False, False], [False, False], [False, True]],
    )
    assert tokens_per_expert(r).tolist() == [2, 1, 0, 1]
    torch.testing.assert_close(expert_share(r), torch.tensor([0.5, 0.25, 0.0, 0.25], dtype=torch.float64))
    empty = record([[0]], valid=[[False]])
    assert expert_share(empty).tolist() == [0.0] * 4


def test_modality_and_class_counts_count_each_choice_and_follow_sample_labels():
    r = record(
        [[0, 1], [0, 1], [2, 3], [2, 0]],
        modality=[0, 0, 1, 1],
        sample=[0, 1, 1, 2],
        weight=[[0.75, 0.25], [0.5, 0.5], [0.5, 0.5], [0.9, 0.1]],
    )
    mod = expert_modality_counts(r, 2)
    assert mod.tolist() == [[2, 1], [2, 0], [0, 2], [0, 1]]
    assert mod.sum() == 8  # 4 tokens x k=2 choices
    weighted = expert_modality_counts(r, 2, weighted=True)
    torch.testing.assert_close(weighted[0], torch.tensor([1.25, 0.1], dtype=torch.float64))
    labels = torch.tensor([1, 0, -100])  # sample 2 is ignored
    cls = expert_class_counts(r, labels, 2)
    assert cls.tolist() == [[1, 1], [1, 1], [1, 0], [1, 0]]
    with pytest.raises(ValueError, match="num_modalities"):
        expert_modality_counts(r, 1)


def test_entropy_uniform_is_log_e_and_one_hot_is_zero():
    e = 4
    uniform = record([[0], [1]], num_experts=e)
    torch.testing.assert_close(router_entropy(uniform), torch.full((2,), math.log(e), dtype=torch.float64))
    torch.testing.assert_close(normalized_entropy(uniform), torch.ones(2, dtype=torch.float64))
    one_hot = record([[0], [2]], num_experts=e, probs=torch.eye(e)[[0, 2]])
    assert router_entropy(one_hot).tolist() == [0.0, 0.0]


def test_mutual_information_independent_zero_diagonal_log_k_and_specialisation():
    independent = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 5.0]))
    assert mutual_information(independent) == pytest.approx(0.0, abs=1e-12)
    assert normalized_mutual_information(independent) == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(specialisation(independent), torch.zeros(3, dtype=torch.float64))
    k = 3
    diagonal = torch.eye(k) * 5
    assert mutual_information(diagonal) == pytest.approx(math.log(k))
    assert normalized_mutual_information(diagonal) == pytest.approx(1.0)
    assert normalized_mutual_information(torch.tensor([[3.0, 4.0]])) == 0.0  # one expert: H(E) = 0
    assert mutual_information(torch.zeros(2, 2)) == 0.0
    # Expert 0 sees only modality 0, expert 1 sees both equally, expert 2 nothing.
    counts = torch.tensor([[4.0, 0.0], [2.0, 2.0], [0.0, 0.0]])
    spec = specialisation(counts)
    p0 = 6 / 8  # marginal share of modality 0
    assert spec[0] == pytest.approx(-math.log(p0))
    assert spec[1] == pytest.approx(0.5 * math.log(0.5 / p0) + 0.5 * math.log(0.5 / (1 - p0)))
    assert spec[2] == 0.0
    assert spec[0] > spec[1]
    # MI is the p(e)-weighted mean of specialisation.
    assert mutual_information(counts) == pytest.approx(float((counts.sum(1) / counts.sum() * spec).sum()))
    index, share = dominant(counts)
    assert index[:2].tolist() == [0, 0] and share.tolist() == [1.0, 0.5, 0.0]


def test_drop_rate_counts_capacity_drops_over_valid_choices():
    r = record(
        [[0, 1], [0, 1], [0, 2]],
        valid=[[True, True], [True, True], [True, False]],
        dropped=[[False, False], [False, False], [True, False]],
        capacity=2,
    )
    assert drop_rate(r) == pytest.approx(1 / 5)
    assert drop_rate(record([[0], [1]])) == 0.0


def test_routing_shift_identical_zero_disjoint_one():
    full = record([[0], [1], [2], [3]], modality=[0, 0, 1, 1])
    assert routing_shift(full, full, 0) == 0.0
    partial = record([[2], [3]], modality=[0, 0])  # modality 0 moves to experts 2 and 3
    assert routing_shift(full, partial, 0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no routed tokens"):
        routing_shift(full, partial, 1)


def test_concat_records_shifts_sample_ids():
    a = record([[0], [1]], sample=[0, 1])
    b = record([[2]], sample=[0])
    joined = concat_records([a, b])
    assert joined.sample.tolist() == [0, 1, 2]
    assert tokens_per_expert(joined).tolist() == [1, 1, 1, 0]
    assert concat_records([a, b], sample_offsets=[0, 10]).sample.tolist() == [0, 1, 10]
    with pytest.raises(ValueError, match="experts"):
        concat_records([a, record([[0]], num_experts=3)])


def collapsed(e=4):
    return record([[0]] * 4, num_experts=e, probs=torch.eye(e)[[0] * 4])


def test_collapse_status_flags_share_and_entropy():
    s = collapse_status(collapsed(), max_share=0.5, min_entropy=0.2)
    assert s == {"top_share": 1.0, "top_expert": 0, "mean_entropy": 0.0, "share_alarm": True, "entropy_alarm": True}
    healthy = collapse_status(record([[0], [1], [2], [3]]), max_share=0.5, min_entropy=0.2)
    assert not healthy["share_alarm"] and not healthy["entropy_alarm"]
    assert healthy["mean_entropy"] == pytest.approx(1.0)


def test_collapse_monitor_warns_once_per_episode_and_round_trips_state():
    monitor = CollapseMonitor(max_share=0.5, min_entropy=0.2, patience=3)
    healthy = record([[0], [1], [2], [3]])
    bad = [healthy, collapsed()]  # layer 1 collapses
    assert monitor.update(bad) == [] and monitor.update(bad) == []
    (message,) = monitor.update(bad)
    assert "layer 1" in message and "step 3" in message and "100.0%" in message
    assert "load-balance" in message and "jitter" in message and "learning rate" in message
    assert monitor.update(bad) == []  # still collapsed: no repeat
    state = json.loads(json.dumps(monitor.state_dict()))
    resumed = CollapseMonitor(patience=3)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == monitor.state_dict()
    assert resumed.update(bad) == []  # the resumed monitor remembers it already warned
    assert resumed.update([healthy, healthy]) == []  # recovers
    assert resumed.update(bad) == [] and resumed.update(bad) == []
    (again,) = resumed.update(bad, step=100)
    assert "layer 1" in again and "step 100" in again


def test_token_share_reaches_one_when_every_token_shares_an_expert():
    from modalmoe.analysis.routing import collapse_status, token_share

    index = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]])
    record = RoutingRecord(
        expert_index=index,
        weight=torch.full((4, 2), 0.5),
        probs=torch.full((4, 4), 0.25),
        logits=None,
        modality=torch.zeros(4, dtype=torch.long),
        sample=torch.arange(4),
        dropped=torch.zeros(4, 2, dtype=torch.bool),
        valid=torch.ones(4, 2, dtype=torch.bool),
        num_experts=4,
    )
    assert token_share(record).tolist() == [1.0, 0.5, 0.25, 0.25]
    status = collapse_status(record, max_share=0.8, min_entropy=0.2)
    assert status["top_expert"] == 0 and status["share_alarm"] and not status["entropy_alarm"]
