"""The top-p router (moe/routers/top_p.py): each token takes the fewest experts whose mass
reaches p, at most max_k; null experts run nothing, so a token routed only to them comes out
of the layer as exactly 0; masks, gate weights, dispatch, gradients, pruning and a full model."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from modalmoe.data.tasks import load_task
from modalmoe.model import build_model
from modalmoe.model.presets import get_preset
from modalmoe.moe import build_moe_layer, plan_dispatch, routers
from modalmoe.moe.routers.top_p import MASS_TOLERANCE, TopPRouter
from test_moe_oracles import naive_moe  # the per-expert loop every dispatch oracle shares

D, H, E = 8, 16, 5


def router(seed=0, scale=1.0, **options):
    torch.manual_seed(seed)
    r = routers.create("top_p", dim=D, num_experts=E, **options)
    with torch.no_grad():
        r.weight.mul_(scale)  # larger logits: more confident tokens, fewer experts
    return r


def route(r, x, **kwargs):
    zeros = torch.zeros(x.shape[0], dtype=torch.long)
    return r(x, zeros, zeros, **kwargs)


def full_distribution(r, x):
    """The router's distribution over all E + N experts, in float64 (softmax gating)."""
    return F.softmax((x @ r.weight.t()).double(), dim=-1)


def fewest_reaching(probs, p):
    """By brute force over every subset: the size of the smallest set of experts whose mass
    reaches p (within the router's tolerance)."""
    experts = range(len(probs))
    for size in range(1, len(probs) + 1):
        if any(sum(probs[e] for e in s) >= p - MASS_TOLERANCE for s in itertools.combinations(experts, size)):
            return size
    raise AssertionError("no subset reaches p")


def chosen(routing, t):
    """Token t's chosen (real) experts, best first."""
    return routing.expert_index[t][routing.valid[t]].tolist()


@pytest.mark.parametrize("p", [1e-9, 0.2, 0.5, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("nulls", [0, 2])
def test_each_token_takes_the_fewest_experts_whose_mass_reaches_p(p, nulls):
    r = router(seed=1, scale=3.0, p=p, null_experts=nulls)
    x = torch.randn(64, D)
    routing = route(r, x)
    full = full_distribution(r, x)
    assert routing.expert_index.shape == routing.valid.shape == (64, E)
    for t in range(64):
        probs = full[t].tolist()
        size = fewest_reaching(probs, p)
        # The same count by the greedy definition (best first, ties by the lower index),
        # with the null experts (ids E..E+N-1) in the prefix but not among the chosen.
        order = sorted(range(E + nulls), key=lambda e: (-probs[e], e))
        prefix = order[:size]
        assert sum(probs[e] for e in prefix) >= p - MASS_TOLERANCE
        assert size == 1 or sum(probs[e] for e in prefix[:-1]) < p - MASS_TOLERANCE
        assert chosen(routing, t) == [e for e in prefix if e < E], t
    if p < MASS_TOLERANCE:
        assert (routing.valid.sum(-1) <= 1).all()  # exactly the best expert (or a null one)
        if not nulls:
            assert routing.valid.sum(-1).eq(1).all()
            assert torch.equal(routing.expert_index[:, 0], full.argmax(-1))


def test_p_one_takes_every_expert_and_a_tiny_p_only_the_best():
    x = torch.randn(50, D)
    assert route(router(seed=12, p=1.0), x).valid.all()
    tiny = route(router(seed=12, p=1e-9), x)
    assert tiny.valid.sum(-1).eq(1).all() and torch.equal(tiny.expert_index[:, 0], tiny.probs.argmax(-1))


def test_the_count_adapts_to_the_token_confidence():
    """Confident tokens take fewer experts than uncertain ones."""
    r = router(seed=2, p=0.6)
    x = torch.randn(200, D)
    sharp, flat = route(r, 20 * x).valid.sum(-1), route(r, 0.01 * x).valid.sum(-1)
    assert sharp.float().mean() < flat.float().mean()
    assert flat.min() >= math.ceil(0.6 * E) - 1  # near-uniform: about p * E experts


def test_ties_go_to_the_lower_expert_index():
    r = router(p=0.5)
    with torch.no_grad():
        r.weight.zero_()  # every expert equally likely
    routing = route(r, torch.randn(4, D))
    assert all(chosen(routing, t) == [0, 1, 2] for t in range(4))  # 2 * 1/5 < 0.5 <= 3 * 1/5


@pytest.mark.parametrize("nulls", [0, 3])
def test_max_k_caps_the_choices_and_the_width(nulls):
    r = router(seed=3, p=1.0, max_k=2, null_experts=nulls)
    x = torch.randn(50, D)
    routing = route(r, x)
    assert routing.expert_index.shape == (50, 2) and r.k == 2
    full = full_distribution(r, x)
    top2 = full.topk(2, dim=-1).indices
    for t in range(50):  # p=1 wants every expert; the cap keeps the best two, nulls included
        assert chosen(routing, t) == [e for e in top2[t].tolist() if e < E]
    if not nulls:
        assert routing.valid.all()


def test_gate_weights_are_the_chosen_probabilities_or_sum_to_one():
    x = torch.randn(40, D)
    raw = route(router(seed=4, p=0.7), x)
    assert torch.equal(raw.weight, raw.probs.gather(1, raw.expert_index) * raw.valid)
    assert (raw.weight[~raw.valid] == 0).all() and (raw.weight.sum(-1) >= 0.7 - MASS_TOLERANCE).all()
    torch.testing.assert_close(raw.probs.sum(-1), torch.ones(40))
    normed = route(router(seed=4, p=0.7, normalize=True), x)
    assert torch.equal(normed.valid, raw.valid) and torch.equal(normed.expert_index, raw.expert_index)
    torch.testing.assert_close(normed.weight.sum(-1), torch.ones(40))
    assert (normed.weight[~normed.valid] == 0).all()


def test_with_null_experts_weights_are_probabilities_over_all_experts_and_probs_cover_the_real_ones():
    r = router(seed=5, scale=3.0, p=0.7, null_experts=2)
    x = torch.randn(40, D)
    routing = route(r, x)
    assert r.weight.shape == (E + 2, D)
    assert routing.probs.shape == routing.logits.shape == (40, E)
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(40))
    full = full_distribution(r, x).float()
    torch.testing.assert_close(routing.probs, full[:, :E] / full[:, :E].sum(-1, keepdim=True))
    torch.testing.assert_close(routing.weight, full.gather(1, routing.expert_index) * routing.valid)
    torch.testing.assert_close(routing.logits, x @ r.weight[:E].t())
    # Normalised weights divide by the mass of every choice, the null ones included.
    normed = route(router(seed=5, scale=3.0, p=0.7, null_experts=2, normalize=True), x)
    assert torch.equal(normed.valid, routing.valid)
    mass = torch.tensor([sum(sorted(row, reverse=True)[: fewest_reaching(row, 0.7)]) for row in full.tolist()])
    torch.testing.assert_close(normed.weight, routing.weight / mass.unsqueeze(1))
    assert (normed.weight.sum(-1) <= 1 + 1e-6).all() and (normed.weight.sum(-1) < 1 - 1e-3).any()


@pytest.mark.parametrize("gating", ["softmax", "sigmoid", "laplace"])
def test_every_gating_routes_by_mass(gating):
    r = router(seed=6, p=0.5, gating=gating)
    routing = route(r, torch.randn(30, D))
    mass = (routing.probs.gather(1, routing.expert_index) * routing.valid).sum(-1)
    assert (mass >= 0.5 - MASS_TOLERANCE).all()
    assert routing.valid[:, 0].all()


@pytest.mark.parametrize("nulls", [0, 2])
def test_a_mask_is_respected(nulls):
    r = router(seed=7, p=0.9, null_experts=nulls)
    g = torch.Generator().manual_seed(0)
    allowed = torch.rand(60, E, generator=g) < 0.5
    allowed[torch.arange(60), torch.randint(0, E, (60,), generator=g)] = True  # one open expert at least
    routing = route(r, torch.randn(60, D), allowed=allowed)
    rows = torch.arange(60).unsqueeze(1).expand_as(routing.expert_index)
    assert allowed[rows[routing.valid], routing.expert_index[routing.valid]].all()
    assert (routing.probs[~allowed] == 0).all()
    with pytest.raises(ValueError, match=r"allowed must be \[T, E\]"):
        route(r, torch.randn(60, D), allowed=allowed[:, :-1])


def test_a_layer_with_one_open_expert_per_token_builds_and_keeps_to_it():
    """Top-p needs one open expert (top-2 token choice would refuse this reservation)."""
    layer = build_moe_layer(
        dim=D,
        hidden=H,
        num_experts=E,
        router="top_p",
        p=0.9,
        reserved={"modality": (("a", "b"), {"a": [0], "b": [1, 2, 3, 4]})},
    )
    modality = torch.arange(30) % 2
    record = layer(torch.randn(30, D), modality).record
    a = modality == 0
    assert (record.expert_index[a][record.valid[a]] == 0).all() and record.valid[a].sum(-1).eq(1).all()
    assert not (record.expert_index[~a][record.valid[~a]] == 0).any()


def null_heavy_layer(seed=8, nulls=2, **options):
    """A layer whose null experts dominate for tokens with x[:, 0] > 0: those route to nulls only."""
    torch.manual_seed(seed)
    layer = build_moe_layer(dim=D, hidden=H, num_experts=E, router="top_p", null_experts=nulls, **options)
    with torch.no_grad():
        layer.router.weight[E:] = 0.0
        layer.router.weight[E:, 0] = 40.0
    return layer


def test_a_token_routed_only_to_null_experts_comes_out_as_zero_and_runs_no_expert():
    layer = null_heavy_layer(p=0.5)
    x = torch.randn(40, D)
    x[:20, 0], x[20:, 0] = x[:20, 0].abs() + 0.5, -(x[20:, 0].abs() + 0.5)
    rows = []
    hook = layer.experts.register_forward_hook(lambda m, args, out: rows.append(args[1].num_rows))
    out = layer(x)
    hook.remove()
    record = out.record
    assert not record.valid[:20].any()  # every choice landed on a null expert
    assert record.valid[20:, 0].all()  # the others take real experts
    assert torch.equal(out.x[:20], torch.zeros(20, D))  # the residual passes them through unchanged
    assert (out.x[20:].abs().sum(-1) > 0).all()
    # Nothing is dispatched for them: the bank ran exactly the valid assignments (what the FLOP
    # count charges), fewer than the same layer without the null experts' pull runs.
    plan = plan_dispatch(record.expert_index, E, valid=record.valid)
    assert rows == [int(record.valid.sum())] == [int(plan.counts.sum())]
    assert set(plan.token.tolist()) <= set(range(20, 40))
    with torch.no_grad():
        layer.router.weight[E:, 0] = 0.0
    rows.clear()
    hook = layer.experts.register_forward_hook(lambda m, args, out: rows.append(args[1].num_rows))
    again = layer(x).record
    hook.remove()
    assert rows == [int(again.valid.sum())] and rows[0] > int(record.valid.sum())


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("options", [{}, {"max_k": 2, "normalize": True}, {"null_experts": 2, "p": 0.8}])
def test_dropless_dispatch_equals_a_naive_loop(activation, options):
    torch.manual_seed(9)
    layer = build_moe_layer(dim=D, hidden=H, num_experts=E, router="top_p", activation=activation, **options)
    x = torch.randn(33, D)
    out = layer(x)
    rec = out.record
    assert rec.valid.sum(-1).min() >= (0 if options.get("null_experts") else 1)
    ref = naive_moe(x, rec.expert_index, rec.weight.detach(), rec.valid, layer.experts)
    torch.testing.assert_close(out.x, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nulls", [0, 2])
@pytest.mark.parametrize("normalize", [False, True])
def test_gradients_reach_the_router_weight(nulls, normalize):
    torch.manual_seed(10)
    layer = build_moe_layer(
        dim=D, hidden=H, num_experts=E, router="top_p", null_experts=nulls, normalize=normalize, p=0.8
    )
    out = layer(torch.randn(3, 7, D))
    (out.x.square().sum() + sum(out.aux_losses.values())).backward()
    grad = layer.router.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad.abs().sum(-1) > 0).all()  # every real expert's row, and the null experts' too


def test_pruning_keeps_experts_without_null_experts_and_is_refused_with_them():
    r = router(seed=11, p=1.0)
    r.keep_experts(torch.tensor([3, 0]))
    assert r.num_experts == r.k == 2 and r.weight.shape == (2, D)
    routing = route(r, torch.randn(6, D))
    assert routing.valid.all() and routing.probs.shape == (6, 2)
    with pytest.raises(NotImplementedError, match="does not support dropping experts"):
        router(null_experts=2).keep_experts(torch.tensor([0, 1]))
    capped = router(max_k=3)
    with pytest.raises(ValueError, match="keep at least k"):
        capped.keep_experts(torch.tensor([0, 1]))
    assert capped.k == 3 and capped.num_experts == E


def test_a_full_model_with_top_p_routing_trains_with_finite_losses():
    overrides = [
        "model.moe.router=top_p",
        "model.moe.router_options.p=0.6",
        "model.moe.router_options.null_experts=2",
        "model.moe.router_options.max_k=3",
    ]
    cfg = get_preset("tiny/token-choice", overrides=overrides)
    assert cfg.model.moe.every and cfg.model.moe.router == "top_p"
    task = load_task(cfg.task, **cfg.task_options)
    torch.manual_seed(0)
    model = build_model(cfg.model, task.specs, outputs=task.train.num_classes).fit(task.train).train()
    tops = [m for m in model.modules() if isinstance(m, TopPRouter)]
    assert tops and all(m.null_experts == 2 and m.max_k == 3 and m.p == 0.6 for m in tops)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(3):
        batch = task.train.batch(range(8 * step, 8 * step + 8))
        out = model(batch)
        loss = F.cross_entropy(out.logits, batch.target) + sum(out.aux_losses.values())
        optimizer.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in tops[0].parameters())
        optimizer.step()
        assert out.records and all(r.valid.shape[1] == 3 for r in out.records)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"p": 0.0}, r"p must be in \(0, 1\]"),
        ({"p": 1.5}, r"p must be in \(0, 1\]"),
        ({"p": -0.2}, r"p must be in \(0, 1\]"),
        ({"max_k": 0}, "max_k must be None or between 1 and num_experts=5"),
        ({"max_k": E + 1}, "max_k must be None or between 1 and num_experts=5"),
        ({"null_experts": -1}, "null_experts must be an integer >= 0"),
        ({"gating": "cosine"}, "unknown gating"),
    ],
)
def test_bad_options_give_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        routers.create("top_p", dim=D, num_experts=E, **options)
