"""Expert communication: the topologies, their masks, costs, and their place in the MoE layer."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from modalmoe.moe import MoELayer, build_moe_layer, plan_dispatch
from modalmoe.moe.communication import NoCommunication, communications
from modalmoe.moe.dispatch import dispatch_combine, dispatch_outputs

D, H = 16, 24
EXCHANGES = ("dense", "star")
OUT_PROJECTION = {"dense": "out", "star": "up"}  # the zero-initialised projection of each topology
ROUTINGS = {  # router kwargs for build_moe_layer
    "token_choice": {"router": "token_choice", "k": 2},
    "token_choice_capacity": {"router": "token_choice", "k": 3, "capacity_factor": 0.5},
    "expert_choice": {"router": "expert_choice", "capacity_factor": 1.5},
}


def _layer(seed: int, routing: str, **kw) -> MoELayer:
    torch.manual_seed(seed)
    return build_moe_layer(dim=D, hidden=H, num_experts=6, activation="gelu", **ROUTINGS[routing], **kw)


def _perturb(layer: MoELayer, name: str) -> None:
    proj = getattr(layer.communication, OUT_PROJECTION[name])
    with torch.no_grad():
        proj.weight.normal_(std=0.3)
        proj.bias.normal_(std=0.3)


def _expert(bank, e: int, x):
    """One expert by hand (GELU bank)."""
    return F.gelu(x @ bank.w_in[e]) @ bank.w_out[e]


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_none_is_the_current_fused_layer_bit_for_bit(routing):
    base, named = _layer(0, routing), _layer(0, routing, communication="none")
    assert named.communication is None
    explicit = MoELayer(router=base.router, experts=base.experts, capacity_factor=base.capacity_factor)
    explicit.communication = NoCommunication(dim=D)
    x = torch.randn(23, D)
    want = base(x).x
    for layer in (named, explicit):
        assert torch.equal(layer(x).x, want)
    g = torch.randn_like(want)
    ref_grad = torch.autograd.grad(base(x).x, base.experts.w_in, g)[0]
    assert torch.equal(torch.autograd.grad(explicit(x).x, explicit.experts.w_in, g)[0], ref_grad)


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_ungated_dispatch_then_gated_sum_equals_the_fused_combine(routing):
    layer = _layer(1, routing)
    x = torch.randn(19, D)
    r = layer.router(x, torch.zeros(19, dtype=torch.long), torch.zeros(19, dtype=torch.long))
    valid = torch.ones_like(r.expert_index, dtype=torch.bool) if r.valid is None else r.valid
    capacity = None if layer.capacity_factor is None else 4
    plan = plan_dispatch(r.expert_index, 6, valid=r.valid, capacity=capacity)
    outputs = dispatch_outputs(x, plan, layer.experts, r.expert_index.shape[1])
    keep = valid & ~plan.dropped
    assert torch.all(outputs[~keep] == 0)
    got = NoCommunication(dim=D)(outputs, r.weight, keep)
    torch.testing.assert_close(got, dispatch_combine(x, r.weight, plan, layer.experts))


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("name", EXCHANGES)
def test_fresh_exchange_equals_none_and_learns_once_perturbed(name, routing):
    layer = _layer(2, routing, communication=name)
    plain = MoELayer(router=layer.router, experts=layer.experts, capacity_factor=layer.capacity_factor)
    x = torch.randn(2, 9, D)
    modality = torch.randint(0, 2, (2, 9))
    torch.testing.assert_close(layer(x, modality).x, plain(x, modality).x)

    _perturb(layer, name)
    out = layer(x, modality)
    assert not torch.allclose(out.x, plain(x, modality).x, atol=1e-3)
    (out.x.square().sum() + sum(out.aux_losses.values())).backward()
    for module in (layer.communication, layer.router, layer.experts):
        for pname, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ("none", *EXCHANGES))
def test_dropped_and_invalid_choices_do_not_influence_the_exchange(name):
    torch.manual_seed(3)
    comm = communications.create(name, dim=D)
    if name != "none":
        with torch.no_grad():
            getattr(comm, OUT_PROJECTION[name]).weight.normal_()
    t, k = 12, 4
    outputs, weight = torch.randn(t, k, D), torch.rand(t, k)
    keep = torch.rand(t, k) < 0.5
    keep[0] = False  # a token with no kept choice
    keep[1] = torch.tensor([True, False, False, False])  # one kept choice
    got = comm(outputs, weight, keep)
    outputs2, weight2 = outputs.clone(), weight.clone()
    outputs2[~keep] = 1e3 * torch.randn(int((~keep).sum()), D)
    weight2[~keep] = 10.0
    torch.testing.assert_close(comm(outputs2, weight2, keep), got)
    assert torch.all(got[0] == 0)
    if name != "dense":  # dense lets a choice attend to itself too; the others pass a lone choice through
        torch.testing.assert_close(got[1], weight[1, 0] * outputs[1, 0])


@pytest.mark.parametrize("routing", ["token_choice_capacity", "expert_choice"])
@pytest.mark.parametrize("name", EXCHANGES)
def test_layer_exchange_equals_per_token_exchange_over_kept_choices_only(name, routing):
    """Oracle: each token's exchange over just its kept choices, computed by hand per token."""
    layer = _layer(4, routing, communication=name)
    _perturb(layer, name)
    x = torch.randn(24, D)
    out = layer(x)
    rec = out.record
    keep = rec.valid & ~rec.dropped
    assert (~keep & rec.valid).any() or (~rec.valid).any()  # some choices really are masked
    for t in range(24):
        kept = keep[t].nonzero().squeeze(-1)
        if kept.numel() == 0:
            assert torch.all(out.x[t] == 0)
            continue
        outs = torch.stack([_expert(layer.experts, int(rec.expert_index[t, j]), x[t]) for j in kept])
        ref = layer.communication(outs[None], rec.weight[t, kept][None], torch.ones(1, kept.numel(), dtype=torch.bool))
        torch.testing.assert_close(out.x[t], ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", EXCHANGES)
def test_a_tokens_output_does_not_depend_on_the_rest_of_the_batch(name):
    layer = _layer(5, "token_choice", communication=name)
    _perturb(layer, name)
    x = torch.randn(10, D)
    batch = layer(x).x
    for t in range(10):
        torch.testing.assert_close(layer(x[t : t + 1]).x[0], batch[t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden", [None, 6])
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("name", ("none", *EXCHANGES))
def test_flops_per_token_matches_torch_flop_counter(name, k, hidden):
    comm = communications.create(name, dim=D, hidden=hidden)
    t = 7
    outputs, weight = torch.randn(t, k, D), torch.rand(t, k)
    keep = torch.rand(t, k) < 0.7
    counter = FlopCounterMode(display=False)
    with counter:
        comm(outputs, weight, keep)
    assert counter.get_total_flops() == t * comm.flops_per_token(D, k)
    r = hidden or D // 4
    closed = {"none": 0, "dense": 8 * k * D * r + 4 * k * k * r, "star": 4 * D * r}[name]
    assert comm.flops_per_token(D, k) == closed


def test_communication_configuration_errors():
    with pytest.raises(ValueError, match="soft router has none"):
        build_moe_layer(dim=D, hidden=H, num_experts=4, router="soft", communication="dense")
    torch.manual_seed(6)
    soft = build_moe_layer(dim=D, hidden=H, num_experts=4, router="soft")
    soft.communication = communications.create("star", dim=D)
    with pytest.raises(ValueError, match="soft MoE has none"):
        soft(torch.randn(2, 3, D))
    build_moe_layer(dim=D, hidden=H, num_experts=4, router="soft", communication="none")  # fine
    with pytest.raises(KeyError, match="unknown communication 'dens'.*Did you mean 'dense'"):
        build_moe_layer(dim=D, hidden=H, num_experts=4, communication="dens")
    with pytest.raises(ValueError, match="built for dim=16"):
        communications.create("dense", dim=D).flops_per_token(32, 2)
    with pytest.raises(ValueError, match="hidden must be >= 1"):
        communications.create("star", dim=D, hidden=0)
    layer = build_moe_layer(dim=D, hidden=H, num_experts=4, communication="dense", communication_dim=5)
    assert layer.communication.hidden == 5 and layer.communication.out.in_features == 5
    with pytest.raises(ValueError, match="communication width 8 != expert width 16"):
        MoELayer(router=layer.router, experts=layer.experts, communication=communications.create("dense", dim=8))
