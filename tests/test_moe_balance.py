"""Loss-free bias balancing, the sequence-wise balance loss, group-limited routing and
batch-prioritised dropping: each one's invariant against a brute-force reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import assert_same_checkpoint
from modalmoe.model.presets import get_preset
from modalmoe.moe import build_moe_layer, plan_dispatch, routers
from modalmoe.moe.balance import ExpertBias, balance_keys, update_biases
from modalmoe.moe.losses import load_balance_loss, sequence_balance_loss
from modalmoe.moe.types import RoutingRecord
from modalmoe.train import Trainer, load_checkpoint
from test_moe_oracles import naive_moe

D = 16


def _tokens(t: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, D, generator=g), torch.zeros(t, dtype=torch.long), torch.zeros(t, dtype=torch.long)


def _max_over_mean(index: torch.Tensor, experts: int) -> float:
    load = torch.bincount(index.reshape(-1), minlength=experts).float()
    return float(load.max() / load.mean())


# --- auxiliary-loss-free balancing ---------------------------------------------------------------


@pytest.mark.parametrize("gating", ["softmax", "sigmoid"])
def test_gate_weights_do_not_depend_on_the_bias(gating):
    torch.manual_seed(0)
    router = routers.create("token_choice", dim=D, num_experts=6, k=2, gating=gating, bias_rate=0.1)
    x, m, s = _tokens()
    plain = router(x, m, s)
    router.balance.bias.copy_(torch.tensor([3.0, -3.0, 0.5, 0.0, -0.5, 0.0]))  # big enough to change choices
    biased = router(x, m, s)
    assert not torch.equal(plain.expert_index, biased.expert_index)
    torch.testing.assert_close(plain.probs, biased.probs)  # the distribution never sees the bias
    scores = torch.sigmoid(biased.logits) if gating == "sigmoid" else biased.probs
    chosen = scores.gather(1, biased.expert_index)
    torch.testing.assert_close(biased.weight, chosen / chosen.sum(-1, keepdim=True))
    # and the choice is the top-k of the biased scores
    expected = torch.topk(scores + router.balance.bias, 2, dim=-1).indices
    assert torch.equal(biased.expert_index, expected)
    weight = router.balance.bias.requires_grad or any(p is router.balance.bias for p in router.parameters())
    assert not weight  # a buffer: no gradient, no optimizer


def test_the_bias_moves_a_skewed_router_towards_uniform_load():
    torch.manual_seed(0)
    router = routers.create("token_choice", dim=D, num_experts=8, k=2, bias_rate=0.003)
    x = torch.randn(512, D)
    with torch.no_grad():  # expert 0 leans towards the tokens' mean direction: it takes most of them
        router.weight[0] += 2.0 * x.mean(0) / x.mean(0).norm()
    m = torch.zeros(512, dtype=torch.long)
    ratios = []
    for _ in range(300):  # routing only: the bias is the one thing that moves
        ratios.append(_max_over_mean(router(x, m, m).expert_index, 8))
        update_biases(router)
    assert ratios[0] > 1.8, ratios[0]
    assert max(ratios[-20:]) <= 1.2, ratios[-20:]
    assert abs(float(router.balance.bias.mean())) < 1e-6  # re-centred


def test_eval_and_no_grad_passes_leave_the_counts_untouched():
    router = routers.create("token_choice", dim=D, num_experts=4, k=1, bias_rate=0.01)
    x, m, s = _tokens()
    router.eval()
    router(x, m, s)
    router.train()
    with torch.no_grad():  # OGM-GE's probe pass, FLOPs counting
        router(x, m, s)
    assert float(router.balance.load.sum()) == 0
    update_biases(router)
    assert torch.equal(router.balance.bias, torch.zeros(4))  # nothing counted: no step
    router(x, m, s)
    assert float(router.balance.load.sum()) == 64


def test_micro_batches_count_once_per_step():
    """Two half-batch passes then one update equal one full-batch pass then one update."""
    torch.manual_seed(0)
    a = routers.create("token_choice", dim=D, num_experts=4, k=2, bias_rate=0.05)
    b = routers.create("token_choice", dim=D, num_experts=4, k=2, bias_rate=0.05)
    b.load_state_dict(a.state_dict())
    x, m, s = _tokens()
    a(x, m, s)
    b(x[:32], m[:32], s[:32])
    b(x[32:], m[32:], s[32:])
    assert torch.equal(a.balance.load, b.balance.load)
    update_biases(a), update_biases(b)
    assert torch.equal(a.balance.bias, b.balance.bias)
    assert float(a.balance.bias.abs().max()) <= 0.05 * 1.5 + 1e-7  # one step, re-centred


def test_the_bias_is_a_buffer_in_the_state_dict_and_survives_pruning():
    layer = build_moe_layer(dim=D, hidden=24, num_experts=4, router="token_choice", k=1, bias_rate=0.01)
    assert {"router.balance.bias", "router.balance.load"} <= set(layer.state_dict())
    assert balance_keys(layer) == ["router.balance.bias", "router.balance.load"]
    layer.router.balance.bias.copy_(torch.tensor([0.1, 0.2, 0.3, -0.6]))
    layer.router.keep_experts(torch.tensor([3, 1]))
    assert torch.equal(layer.router.balance.bias, torch.tensor([-0.6, 0.2]))
    with pytest.raises(ValueError, match="bias_rate"):
        ExpertBias(4, rate=0)


def test_a_run_with_bias_balancing_updates_once_per_step_and_resumes_bit_for_bit(
    tmp_path, interrupted_then_resumed, monkeypatch
):
    overrides = [
        "train.epochs=2",
        "train.batch_size=16",
        "train.accumulate=2",
        "train.checkpoint_every=2",
        "train.aux_weights={z_loss: 0.001}",
        "model.moe.router_options.bias_rate=0.01",
    ]
    config = get_preset("tiny/token-choice", overrides=overrides)
    updates = []
    original = ExpertBias.update
    monkeypatch.setattr(ExpertBias, "update", lambda self, load=None: (updates.append(id(self)), original(self, load)))
    Trainer(config, tmp_path / "a", progress=False).fit()
    uninterrupted = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.safetensors")
    steps, layers = uninterrupted.progress["step"], len(set(updates))
    assert layers >= 1 and len(updates) == steps * layers  # once per optimizer step, not per micro-batch
    biases = [k for k in uninterrupted.tensors if k.endswith("balance.bias")]
    assert biases and all(uninterrupted.tensors[k].abs().sum() > 0 for k in biases)
    monkeypatch.setattr(ExpertBias, "update", original)
    # Fail in step 5 of 6, after the mid-epoch checkpoint at step 4.
    _, resumed = interrupted_then_resumed(config, tmp_path / "b", fail_at=10)
    assert_same_checkpoint(uninterrupted, resumed)


# --- the sequence-wise balance loss ---------------------------------------------------------------


def _record(index, probs, sample, experts):
    t, k = index.shape
    return RoutingRecord(
        expert_index=index,
        weight=torch.ones(t, k),
        probs=probs,
        logits=None,
        modality=torch.zeros(t, dtype=torch.long),
        sample=sample,
        dropped=torch.zeros(t, k, dtype=torch.bool),
        valid=torch.ones(t, k, dtype=torch.bool),
        num_experts=experts,
    )


def test_sequence_balance_is_the_switch_loss_within_each_sample_averaged():
    torch.manual_seed(0)
    sample = torch.tensor([5, 5, 2, 2, 2, 9, 5, 9])  # unsorted, non-contiguous ids
    probs = torch.softmax(torch.randn(8, 4), -1)
    index = torch.topk(probs, 2, -1).indices
    record = _record(index, probs, sample, 4)
    per_sample = [
        load_balance_loss(_record(index[sample == s], probs[sample == s], sample[sample == s], 4))
        for s in sample.unique()
    ]
    torch.testing.assert_close(sequence_balance_loss(record), torch.stack(per_sample).mean())
    # Balanced over the batch but each sample on one expert: the batch loss is happy, this one not.
    index = torch.tensor([[0], [0], [1], [1]])
    probs = torch.eye(2)[index.squeeze(1)]
    record = _record(index, probs, torch.tensor([0, 0, 1, 1]), 2)
    assert float(load_balance_loss(record)) == pytest.approx(1.0)
    assert float(sequence_balance_loss(record)) == pytest.approx(2.0)


# --- group-limited routing ----------------------------------------------------------------------


def test_group_limited_routing_picks_inside_the_best_groups():
    torch.manual_seed(0)
    router = routers.create("token_choice", dim=D, num_experts=8, k=2, expert_groups=4, limited_groups=2)
    x, m, s = _tokens(40)
    r = router(x, m, s)
    for t in range(40):
        scores = r.probs[t].view(4, 2)
        group_score = scores.sort(-1, descending=True).values[:, :2].sum(-1)
        kept = set(torch.topk(group_score, 2).indices.tolist())
        allowed = [e for e in range(8) if e // 2 in kept]
        best = sorted(allowed, key=lambda e: -float(r.probs[t, e].detach()))[:2]
        assert set(r.expert_index[t].tolist()) == set(best), t
        assert len({e // 2 for e in r.expert_index[t].tolist()}) <= 2
    for bad in (
        {"expert_groups": 3, "limited_groups": 1},
        {"expert_groups": 4},
        {"expert_groups": 4, "limited_groups": 5},
    ):
        with pytest.raises(ValueError):
            routers.create("token_choice", dim=D, num_experts=8, k=2, **bad)
    with pytest.raises(ValueError, match="fewer than k"):
        routers.create("token_choice", dim=D, num_experts=8, k=3, expert_groups=4, limited_groups=1)


# --- batch-prioritised routing ------------------------------------------------------------------


def test_batch_priority_drops_exactly_the_lowest_priority_assignments():
    torch.manual_seed(0)
    t, k, e, capacity = 30, 2, 4, 9
    index = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    priority = torch.rand(t)
    plan = plan_dispatch(index, e, capacity=capacity, priority=priority)
    # Brute force: per expert, rank its assignments by (choice, -priority) and keep the first C.
    expected = torch.zeros(t, k, dtype=torch.bool)
    for expert in range(e):
        wanted = [
            (j, -float(priority[i]), i) for i, j in itertools.product(range(t), range(k)) if index[i, j] == expert
        ]
        for _, _, i in sorted(wanted)[capacity:]:
            j = int((index[i] == expert).nonzero())
            expected[i, j] = True
    assert torch.equal(plan.dropped, expected)
    assert plan.counts.max() <= capacity
    kept = {(int(a), int(b)) for a, b in zip(plan.token, plan.choice % k, strict=True)}
    assert kept == {(i, j) for i in range(t) for j in range(k) if not expected[i, j]}
    # Without priorities the same limit drops by position (the last tokens).
    by_position = plan_dispatch(index, e, capacity=capacity)
    assert not torch.equal(by_position.dropped, plan.dropped)


def test_the_layer_prioritises_by_top_gate_weight():
    torch.manual_seed(0)
    layer = build_moe_layer(
        dim=D, hidden=24, num_experts=4, router="token_choice", k=1, capacity_factor=0.5, batch_priority=True
    )
    x = torch.randn(40, D)
    rec = layer(x).record
    weight = rec.weight.detach().squeeze(1)
    for expert in range(4):
        mine = rec.expert_index.squeeze(1) == expert
        kept, dropped = mine & ~rec.dropped.squeeze(1), mine & rec.dropped.squeeze(1)
        if dropped.any() and kept.any():
            assert float(weight[kept].min()) >= float(weight[dropped].max())
    assert rec.num_dropped > 0


@pytest.mark.parametrize(
    "options",
    [
        {"bias_rate": 0.01},
        {"expert_groups": 3, "limited_groups": 1},
        {"bias_rate": 0.01, "expert_groups": 3, "limited_groups": 2},
    ],
)
def test_dropless_dispatch_equals_the_naive_loop_with_the_deepseek_options(options):
    torch.manual_seed(1)
    layer = build_moe_layer(dim=D, hidden=24, num_experts=6, router="token_choice", k=2, router_options=options)
    if layer.router.balance is not None:
        layer.router.balance.bias.copy_(torch.linspace(-0.2, 0.2, 6))
    x = torch.randn(37, D)
    out = layer(x)
    rec = out.record
    torch.testing.assert_close(out.x, naive_moe(x, rec.expert_index, rec.weight, rec.valid, layer.experts))
