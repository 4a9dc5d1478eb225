"""Router contracts, capacity semantics, losses and configuration errors."""

import math

import pytest
import torch

from modalmoe.moe import build_moe_layer, expert_capacity, plan_dispatch, routers
from modalmoe.moe.losses import AUX_LOSSES, global_entropy_loss, load_balance_loss, local_entropy_loss, router_z_loss
from modalmoe.moe.types import RoutingRecord
from modalmoe.registry import Registry

D, H = 16, 24
MODALITIES = ("image", "text")


def router_kwargs(name: str) -> dict:
    if name in ("per_task", "task_film"):  # declared over one task, they run without task ids
        return {"tasks": ("only",)}
    return (
        {"modalities": MODALITIES}
        if name in ("modality_experts", "per_modality", "hierarchical", "modality_combination")
        else {}
    )


@pytest.mark.parametrize("name", routers.names())
def test_every_registered_router_builds_and_runs(name):
    torch.manual_seed(0)
    layer = build_moe_layer(dim=D, hidden=H, num_experts=4, router=name, **router_kwargs(name))
    x = torch.randn(3, 5, D)
    modality = torch.randint(0, 2, (3, 5))
    out = layer(x, modality)
    rec = out.record
    assert out.x.shape == x.shape and torch.isfinite(out.x).all()
    assert rec.probs.shape == (15, 4)
    torch.testing.assert_close(rec.probs.sum(-1), torch.ones(15))
    assert rec.expert_index.shape == rec.weight.shape == rec.valid.shape == rec.dropped.shape
    assert set(out.aux_losses) == set(AUX_LOSSES) | set(layer.router.losses)  # the router's own too
    assert all(torch.isfinite(v) for v in out.aux_losses.values())


def test_expert_choice_gives_each_expert_exactly_c_tokens():
    torch.manual_seed(1)
    router = routers.create("expert_choice", dim=D, num_experts=5, experts_per_token=1.5)
    x = torch.randn(40, D)
    r = router(x, torch.zeros(40, dtype=torch.long), torch.zeros(40, dtype=torch.long))
    c = math.ceil(40 * 1.5 / 5)
    assert router.capacity(40) == c == 12
    assert r.valid.sum(0).tolist() == [c] * 5
    per_token = r.valid.sum(1)
    assert per_token.min() >= 0 and per_token.max() <= 5 and per_token.sum() == 5 * c
    plan = plan_dispatch(r.expert_index, 5, valid=r.valid)
    assert plan.counts.tolist() == [c] * 5


def test_expert_choice_old_capacity_factor_name_still_works_with_a_warning():
    with pytest.warns(DeprecationWarning, match="experts_per_token"):
        old = routers.create("expert_choice", dim=D, num_experts=5, capacity_factor=1.5)
    assert old.experts_per_token == 1.5 and old.capacity(40) == 12
    with pytest.raises(ValueError, match="not also its old name"):
        routers.create("expert_choice", dim=D, num_experts=5, capacity_factor=1.5, experts_per_token=1.5)


def test_soft_moe_weights_sum_to_one_per_slot_and_per_token_within_samples():
    torch.manual_seed(2)
    router = routers.create("soft", dim=D, num_experts=3, slots_per_expert=2)
    sample = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])  # unsorted, uneven lengths
    r = router(torch.randn(10, D), torch.zeros(10, dtype=torch.long), sample)
    s = r.soft
    assert s.dispatch.shape == (3, 4, 6)
    torch.testing.assert_close(s.dispatch.sum(1), torch.ones(3, 6))  # each slot over its sample's tokens
    real = torch.zeros(3, 4, dtype=torch.bool)
    real[s.batch_index, s.position] = True
    torch.testing.assert_close(s.combine.sum(-1)[real], torch.ones(10))  # each token over slots
    assert torch.all(s.dispatch[~real] == 0) and torch.all(s.combine[~real] == 0)  # padding never leaks


def test_soft_moe_samples_never_mix():
    torch.manual_seed(3)
    layer = build_moe_layer(dim=D, hidden=H, num_experts=3, router="soft", slots_per_expert=2)
    x = torch.randn(2, 6, D)
    out = layer(x).x
    x2 = x.clone()
    x2[1] = torch.randn(6, D)  # change sample 1 only
    torch.testing.assert_close(layer(x2).x[0], out[0])


def test_capacity_drops_are_counted_and_dropped_tokens_come_out_unchanged():
    torch.manual_seed(4)
    layer = build_moe_layer(dim=D, hidden=H, num_experts=4, k=1, capacity_factor=0.5)
    # Identical tokens all pick the same expert: capacity ceil(0.5 * 12 * 1 / 4) = 2.
    x = torch.randn(1, D).expand(12, D).contiguous()
    out = layer(x)
    rec = out.record
    assert rec.capacity == 2
    assert rec.num_dropped == 10 and rec.dropped.sum() == 10
    kept = ~rec.dropped[:, 0]
    assert kept[:2].all() and not kept[2:].any()  # first come, first served
    assert torch.all(out.x[~kept] == 0)  # so the residual x + out passes them through unchanged
    assert torch.all(out.x[kept] != 0)


def test_capacity_drops_second_choices_before_first_choices():
    expert_index = torch.tensor([[0, 1], [1, 0], [0, 1]])
    plan = plan_dispatch(expert_index, 2, capacity=2)
    # Expert 0 receives first choices from tokens 0 and 2 and a second choice from token 1.
    assert plan.dropped.tolist() == [[False, False], [False, True], [False, True]]


@pytest.mark.parametrize("bad", [0, 0.0, -1.0])
def test_capacity_zero_or_negative_is_an_error_not_a_default(bad):
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        expert_capacity(10, 2, 4, bad)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        build_moe_layer(dim=D, hidden=H, num_experts=4, capacity_factor=bad)


def _record(expert_index, probs, modality=None, logits=None):
    t, k = expert_index.shape
    return RoutingRecord(
        expert_index=expert_index,
        weight=torch.ones(t, k),
        probs=probs,
        logits=logits,
        modality=torch.zeros(t, dtype=torch.long) if modality is None else modality,
        sample=torch.zeros(t, dtype=torch.long),
        dropped=torch.zeros(t, k, dtype=torch.bool),
        valid=torch.ones(t, k, dtype=torch.bool),
        num_experts=probs.shape[1],
    )


def test_load_balance_loss_known_values():
    e = 4
    uniform = _record(torch.arange(8).view(8, 1) % e, torch.full((8, e), 1 / e))
    assert load_balance_loss(uniform).item() == pytest.approx(1.0)
    collapsed_probs = torch.zeros(8, e)
    collapsed_probs[:, 0] = 1
    collapsed = _record(torch.zeros(8, 1, dtype=torch.long), collapsed_probs)
    assert load_balance_loss(collapsed).item() == pytest.approx(e)


def test_z_loss_and_entropy_losses_known_values():
    e = 4
    logits = torch.zeros(6, e)
    rec = _record(torch.zeros(6, 1, dtype=torch.long), torch.full((6, e), 1 / e), logits=logits)
    assert router_z_loss(rec).item() == pytest.approx(math.log(e) ** 2)
    assert local_entropy_loss(rec).item() == pytest.approx(math.log(e))
    assert global_entropy_loss(rec).item() == pytest.approx(-math.log(e))
    assert global_entropy_loss(rec, threshold=math.log(e) + 0.5).item() == pytest.approx(0.5)
    onehot = torch.eye(e)[torch.tensor([0, 1, 2, 3, 0, 1])]
    rec = _record(torch.zeros(6, 1, dtype=torch.long), onehot, modality=torch.tensor([0, 0, 0, 1, 1, 1]))
    assert local_entropy_loss(rec).item() == pytest.approx(0.0, abs=1e-6)
    # each modality spreads evenly over 3 experts: image over {0, 1, 2}, text over {3, 0, 1}
    assert global_entropy_loss(rec).item() == pytest.approx(-math.log(3), abs=1e-5)


def test_modality_experts_route_only_inside_their_group():
    torch.manual_seed(5)
    router = routers.create(
        "modality_experts",
        dim=D,
        num_experts=6,
        modalities=MODALITIES,
        groups={"image": [0, 1], "text": [2, 3]},
        shared=[5],
        k=2,
    )
    modality = torch.randint(0, 2, (50,))
    r = router(torch.randn(50, D), modality, torch.zeros(50, dtype=torch.long))
    allowed = {0: {0, 1, 5}, 1: {2, 3, 5}}
    for t in range(50):
        assert set(r.expert_index[t].tolist()) <= allowed[int(modality[t])]
    assert torch.all(r.probs[:, 4] == 0)  # expert 4 belongs to nobody


def test_per_modality_router_uses_a_gate_per_modality():
    torch.manual_seed(6)
    router = routers.create("per_modality", dim=D, num_experts=4, modalities=MODALITIES, gating="laplace")
    x = torch.randn(1, D).expand(2, D)
    r = router(x, torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long))
    assert not torch.allclose(r.probs[0], r.probs[1])  # same token, different modality gates


@pytest.mark.parametrize("gating", ["softmax", "sigmoid", "laplace"])
def test_token_choice_gatings_and_renormalisation(gating):
    torch.manual_seed(7)
    router = routers.create("token_choice", dim=D, num_experts=5, k=2, gating=gating)
    r = router(torch.randn(9, D), torch.zeros(9, dtype=torch.long), torch.zeros(9, dtype=torch.long))
    torch.testing.assert_close(r.weight.sum(-1), torch.ones(9))
    raw = routers.create("token_choice", dim=D, num_experts=5, k=2, gating=gating, normalize=False)
    raw.load_state_dict(router.state_dict())
    r2 = raw(torch.randn(9, D), torch.zeros(9, dtype=torch.long), torch.zeros(9, dtype=torch.long))
    assert torch.all(r2.weight.sum(-1) <= 2.0)


def test_jitter_only_in_training():
    torch.manual_seed(8)
    router = routers.create("token_choice", dim=D, num_experts=5, jitter_eps=0.5)
    x, z = torch.randn(9, D), torch.zeros(9, dtype=torch.long)
    router.eval()
    torch.testing.assert_close(router(x, z, z).probs, router(x, z, z).probs)
    router.train()
    assert not torch.allclose(router(x, z, z).probs, router(x, z, z).probs)


def test_bad_configurations_give_clear_errors():
    with pytest.raises(ValueError, match="k must be between 1 and num_experts=4"):
        routers.create("token_choice", dim=D, num_experts=4, k=5)
    with pytest.raises(KeyError, match="unknown router 'token_choise'.*Did you mean 'token_choice'.*Known routers"):
        routers.create("token_choise", dim=D, num_experts=4)
    with pytest.raises(ValueError, match=r"modality map names \['audio'\]"):
        routers.create(
            "modality_experts",
            dim=D,
            num_experts=4,
            modalities=MODALITIES,
            groups={"image": [0], "text": [1], "audio": [2]},
        )
    with pytest.raises(ValueError, match=r"no expert group for \['text'\]"):
        routers.create("modality_experts", dim=D, num_experts=4, modalities=MODALITIES, groups={"image": [0]})
    with pytest.raises(ValueError, match="outside"):
        routers.create(
            "modality_experts", dim=D, num_experts=4, modalities=MODALITIES, groups={"image": [0], "text": [7]}
        )
    with pytest.raises(ValueError, match="unknown gating"):
        routers.create("token_choice", dim=D, num_experts=4, gating="cosine")
    router = routers.create("per_modality", dim=D, num_experts=4, modalities=MODALITIES)
    with pytest.raises(ValueError, match="modality ids must be in"):
        router(torch.randn(3, D), torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="router has 4 experts but the bank has 3"):
        from modalmoe.moe import ExpertBank, MoELayer

        MoELayer(
            router=routers.create("token_choice", dim=D, num_experts=4),
            experts=ExpertBank(num_experts=3, dim=D, hidden=H),
        )
    with pytest.raises(ValueError, match="unknown activation"):
        build_moe_layer(dim=D, hidden=H, num_experts=4, activation="relu")


def test_registry_rejects_duplicates_and_lists_names():
    reg = Registry("widget")
    reg.register("a")(dict)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(dict)
    assert reg.names() == ["a"] and "a" in reg and reg.create("a") == {}


def test_uniform_switch_balances_routing_exactly():
    layer = build_moe_layer(dim=D, hidden=H, num_experts=4, k=2, uniform=True)
    out = layer(torch.randn(10, D))
    assert torch.bincount(out.record.expert_index.reshape(-1), minlength=4).tolist() == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="uniform=True"):
        build_moe_layer(dim=D, hidden=H, num_experts=4, router="expert_choice", uniform=True)(torch.randn(10, D))


def _hierarchical(**kw):
    return routers.create("hierarchical", dim=D, num_experts=kw.pop("num_experts", 8), modalities=MODALITIES, **kw)


@pytest.mark.parametrize(("groups", "k"), [(2, 1), (2, 3), (4, 2), (1, 2)])
def test_hierarchical_router_chooses_experts_inside_one_group_and_probs_are_a_distribution(groups, k):
    torch.manual_seed(9)
    router = _hierarchical(groups=groups, k=k)
    size = 8 // groups
    modality = torch.randint(0, 2, (64,))
    r = router(torch.randn(64, D), modality, torch.zeros(64, dtype=torch.long))
    group = r.expert_index // size
    assert torch.all(group == group[:, :1])  # every choice of a token lies in one group
    assert torch.all(r.expert_index.sort(-1).values.diff(dim=-1) > 0)  # k distinct experts
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(64))
    assert torch.all(r.probs >= 0)
    torch.testing.assert_close(r.weight.sum(-1), torch.ones(64))  # renormalised over the k
    # The chosen experts are the chosen group's top-k by probability.
    in_group = r.probs.view(64, groups, size)[torch.arange(64), group[:, 0]]
    assert torch.equal(in_group.topk(k, dim=-1).indices + group[:, :1] * size, r.expert_index)
    assert r.logits.shape == (64, 8) and torch.isfinite(r.logits).all()
    raw = _hierarchical(groups=groups, k=k, normalize=False)
    raw.load_state_dict(router.state_dict())
    r2 = raw(torch.randn(64, D), modality, torch.zeros(64, dtype=torch.long))
    torch.testing.assert_close(r2.weight, r2.probs.gather(1, r2.expert_index))  # raw: p(g) p(e | g)


def test_hierarchical_modality_bias_sends_modality_i_to_group_i_mod_g_at_init():
    torch.manual_seed(10)
    modalities = ("image", "text", "audio")
    router = routers.create("hierarchical", dim=D, num_experts=6, modalities=modalities, groups=2, k=2)
    modality = torch.tensor([0, 1, 2] * 5)
    x = 1e-3 * torch.randn(15, D)
    r = router(x, modality, torch.zeros(15, dtype=torch.long))
    assert (r.expert_index // 3 == (modality % 2).unsqueeze(1)).all()
    # Group mass follows the prior: sigmoid(1) for the preferred group of a near-zero token.
    p_pref = r.probs.view(15, 2, 3).sum(-1).gather(1, (modality % 2).unsqueeze(1))
    torch.testing.assert_close(
        p_pref.squeeze(1), torch.full((15,), torch.sigmoid(torch.tensor(1.0)).item()), atol=1e-2, rtol=0
    )


def test_hierarchical_group_gate_learns_from_the_task_loss_alone():
    torch.manual_seed(11)
    layer = build_moe_layer(dim=D, hidden=H, num_experts=8, router="hierarchical", modalities=MODALITIES, groups=2, k=2)
    out = layer(torch.randn(20, D), torch.randint(0, 2, (20,)))
    out.x.square().sum().backward()
    for name in ("group_weight", "modality_bias", "weight"):
        grad = getattr(layer.router, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_hierarchical_router_bad_configurations():
    with pytest.raises(ValueError, match="cannot be split evenly into groups=3"):
        _hierarchical(groups=3)
    with pytest.raises(ValueError, match="k=3 is larger than a group"):
        _hierarchical(groups=4, k=3)
    with pytest.raises(ValueError, match="groups must be an integer >= 1"):
        _hierarchical(groups=0)
    with pytest.raises(ValueError, match="modality ids must be in"):
        _hierarchical()(torch.randn(2, D), torch.tensor([0, 2]), torch.zeros(2, dtype=torch.long))
