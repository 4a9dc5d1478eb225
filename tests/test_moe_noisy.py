"""Noisy top-k gating (Shazeer et al. 2017): clean top-k in evaluation, learned Gaussian noise
in training, the importance and smooth-load losses against their definitions and a
Monte-Carlo estimate, dispatch against a naive loop, and its losses in a config and a run."""

import json

import pytest
import torch
import torch.nn.functional as F

from modalmoe.config import ConfigError
from modalmoe.model.presets import get_preset
from modalmoe.moe import build_moe_layer, routers
from modalmoe.moe.losses import AUX_LOSSES
from modalmoe.moe.routers.noisy_top_k import cv_squared, kth_excluding, load_probability, noisy_top_k_gating
from modalmoe.train import Trainer
from test_moe_oracles import naive_moe  # the per-expert loop every dispatch oracle shares

D, H = 8, 16
LOSSES = {"importance", "noisy_load"}


def make(num_experts=4, k=2, seed=0, noise=True, **kwargs):
    """A router whose noise weights are not zero, so the noise scale differs per token and expert."""
    torch.manual_seed(seed)
    router = routers.create("noisy_top_k", dim=D, num_experts=num_experts, k=k, **kwargs)
    if noise:
        with torch.no_grad():
            router.noise_weight.normal_(std=0.5)
    return router


def route(router, x, **kwargs):
    ids = torch.zeros(x.shape[0], dtype=torch.long)
    return router(x, ids, ids, **kwargs)


def test_the_router_declares_its_losses_mask_and_expert_params():
    router = make(noise=False)
    assert router.losses == ("importance", "noisy_load") and router.accepts_mask
    assert set(router.expert_params) == {"weight", "noise_weight"}
    assert (router.noise_weight == 0).all() and router.weight.abs().sum() > 0  # see the docstring's init
    with pytest.raises(ValueError, match="noise_eps must be > 0"):
        routers.create("noisy_top_k", dim=D, num_experts=4, noise_eps=0.0)


def test_eval_is_deterministic_and_equals_clean_top_k_with_softmax_over_the_kept():
    router = make(num_experts=6, k=3).eval()
    x = torch.randn(20, D)
    a, b = route(router, x), route(router, x)
    for name in ("expert_index", "weight", "probs", "logits"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    clean = x @ router.weight.t()
    values, index = clean.topk(3, dim=-1)
    assert torch.equal(a.expert_index, index)
    torch.testing.assert_close(a.weight, F.softmax(values, dim=-1))
    torch.testing.assert_close(a.logits, clean)
    torch.testing.assert_close(a.probs, F.softmax(clean, dim=-1))
    torch.testing.assert_close(a.probs.sum(-1), torch.ones(20))


def test_training_adds_noise_whose_std_is_softplus_of_x_w_noise():
    router = make(num_experts=4, k=2, noise_eps=0.05).train()
    x = torch.randn(3, D)
    assert not torch.equal(route(router, x).logits, route(router, x).logits)  # two passes differ
    draws = 20000
    torch.manual_seed(1)
    h = route(router, x.repeat(draws, 1)).logits.detach().view(draws, 3, 4)  # each copy: its own noise
    clean = x @ router.weight.t().detach()
    std = F.softplus(x @ router.noise_weight.t().detach()) + 0.05
    noise = h - clean
    torch.testing.assert_close(noise.mean(0), torch.zeros(3, 4), atol=5 * std.max().item() / draws**0.5, rtol=0)
    torch.testing.assert_close(noise.std(0), std, rtol=0.03, atol=0)
    assert std.max() / std.min() > 1.5  # the check sees the scale vary by token and expert


def test_training_routes_on_the_noisy_logits():
    router = make(num_experts=5, k=2).train()
    x = torch.randn(30, D)
    r = route(router, x)
    values, index = r.logits.topk(2, dim=-1)
    assert torch.equal(r.expert_index, index)
    torch.testing.assert_close(r.weight, F.softmax(values, dim=-1))
    torch.testing.assert_close(r.probs, F.softmax(r.logits, dim=-1))
    assert not torch.equal(r.logits, x @ router.weight.t())


def brute_kth_excluding(h, k):
    out = torch.empty_like(h)
    for t in range(h.shape[0]):
        for i in range(h.shape[1]):
            others = sorted((h[t, j].item() for j in range(h.shape[1]) if j != i), reverse=True)
            out[t, i] = others[k - 1] if len(others) >= k else float("-inf")
    return out


@pytest.mark.parametrize(("experts", "k"), [(5, 1), (5, 2), (5, 4), (5, 5), (1, 1), (3, 3)])
def test_kth_excluding_matches_a_brute_force_loop(experts, k):
    h = torch.randn(7, experts, generator=torch.Generator().manual_seed(experts * 10 + k))
    torch.testing.assert_close(kth_excluding(h, k), brute_kth_excluding(h, k))


def test_kth_excluding_skips_masked_experts():
    h = torch.tensor([[3.0, float("-inf"), 1.0, 2.0], [float("-inf"), 0.5, float("-inf"), -1.0]])
    torch.testing.assert_close(kth_excluding(h, 2), brute_kth_excluding(h, 2))
    assert kth_excluding(h, 2)[1].tolist() == [-1.0, float("-inf"), -1.0, float("-inf")]


def small_example(seed=3, tokens=3, experts=4):
    """Clean logits and noise scales of comparable size, so P(x, i) lies well inside (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(tokens, experts, generator=g)
    std = F.softplus(torch.randn(tokens, experts, generator=g)) + 0.3
    return clean, std, g


def in_top_k(h, k):
    """[..., E] whether each component is among the k largest of its row."""
    return torch.zeros_like(h, dtype=torch.bool).scatter(-1, h.topk(k, dim=-1).indices, True)


def test_load_estimator_matches_monte_carlo_when_only_expert_i_is_redrawn():
    """P(x, i) is the probability that i stays in the top k when its own noise is drawn again
    and the other components keep theirs (the paper's definition)."""
    k, draws = 2, 50000
    clean, std, g = small_example()
    h = clean + torch.randn(clean.shape, generator=g) * std
    p = load_probability(clean, h, std, k)
    mc = torch.empty_like(p)
    for i in range(clean.shape[1]):
        redrawn = h.expand(draws, *h.shape).clone()
        redrawn[..., i] = clean[:, i] + torch.randn(draws, clean.shape[0], generator=g) * std[:, i]
        mc[:, i] = in_top_k(redrawn, k)[..., i].float().mean(0)
    torch.testing.assert_close(p, mc, atol=0.012, rtol=0)
    assert ((p > 0.05) & (p < 0.95)).sum() >= 4  # the check is not on saturated values only
    # The check can tell: a threshold that does not exclude i (the k-th of all of H) misses.
    kth = h.topk(k, dim=-1).values[:, -1:]
    naive = torch.special.ndtr((clean - kth) / std)
    assert (naive - mc).abs().max() > 0.1


def test_load_estimator_averaged_over_noise_is_the_chance_of_being_in_the_top_k():
    """Averaged over all the noise, P(x, i) is P(expert i in the top k), so the load is the
    expected number of tokens each expert gets."""
    k, draws = 2, 20000
    clean, std, g = small_example(seed=4)
    h = clean + torch.randn(draws, *clean.shape, generator=g) * std
    p = load_probability(clean.expand_as(h).reshape(-1, 4), h.reshape(-1, 4), std.expand_as(h).reshape(-1, 4), k)
    torch.testing.assert_close(p.view_as(h).mean(0), in_top_k(h, k).float().mean(0), atol=0.015, rtol=0)


def test_the_router_returns_the_losses_of_its_definition():
    router = make(num_experts=5, k=2).train()
    x = torch.randn(11, D)
    torch.manual_seed(5)
    r = route(router, x)
    torch.manual_seed(5)
    noise = torch.randn(11, 5)
    clean, std = x @ router.weight.t(), router.noise_std(x)
    h = clean + noise * std
    torch.testing.assert_close(r.logits, h)
    gates = torch.zeros(11, 5).scatter(1, r.expert_index, r.weight)
    importance, load = gates.sum(0), load_probability(clean, h, std, 2).sum(0)
    torch.testing.assert_close(r.aux["importance"], importance.var(unbiased=False) / importance.mean() ** 2)
    torch.testing.assert_close(r.aux["noisy_load"], load.var(unbiased=False) / load.mean() ** 2)
    assert set(r.aux) == LOSSES


def test_cv_squared_known_values():
    assert cv_squared(torch.tensor([2.0, 2.0, 2.0])).item() == 0
    assert cv_squared(torch.tensor([2.0, 0.0])).item() == pytest.approx(1.0)
    assert cv_squared(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx((2 / 3) / 4)
    assert cv_squared(torch.tensor([5.0])).item() == 0  # one expert
    assert cv_squared(torch.zeros(4)).item() == 0  # no tokens


def test_losses_are_zero_when_balanced_and_positive_otherwise():
    # Two experts, k=1, W_g = 3 * I, W_noise = 0: token [1, 0] favours expert 0, [0, 1] expert 1.
    router = routers.create("noisy_top_k", dim=2, num_experts=2, k=1).eval()
    with torch.no_grad():
        router.weight.copy_(3 * torch.eye(2))
    balanced = route(router, torch.eye(2)).aux
    assert balanced["importance"].item() == 0 and balanced["noisy_load"].item() == pytest.approx(0, abs=1e-7)
    skewed = route(router, torch.tensor([[1.0, 0.0], [1.0, 0.0]])).aux
    assert skewed["importance"].item() == pytest.approx(1.0)  # importance [2, 0]
    assert skewed["noisy_load"].item() > 0.5  # load [2 Phi(3 / 0.70), 2 Phi(-3 / 0.70)]
    # The same holds in training: the noise moves both losses off their eval values.
    router.train()
    torch.manual_seed(0)
    assert route(router, torch.tensor([[1.0, 0.0], [1.0, 0.0]])).aux["importance"] > 0.5


@pytest.mark.parametrize("tokens", [0, 1, 9])
@pytest.mark.parametrize(("experts", "k"), [(1, 1), (3, 3), (4, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_losses_are_finite_for_every_size(tokens, experts, k, training):
    router = make(num_experts=experts, k=k).train(training)
    x = torch.randn(tokens, D, requires_grad=True)
    r = route(router, x)
    assert r.expert_index.shape == r.weight.shape == (tokens, k)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in r.aux.values())
    sum(r.aux.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in (x, router.weight, router.noise_weight))
    if experts == 1:
        assert r.aux["importance"].item() == 0 and r.aux["noisy_load"].item() == 0
    if experts == k:  # every expert is always chosen: P = 1, equal load
        clean, std = x @ router.weight.t(), router.noise_std(x)
        assert (load_probability(clean, r.logits, std, k) == 1).all()
        assert r.aux["noisy_load"].item() == 0


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_each_loss_has_gradients_reaching_w_g_and_w_noise(loss):
    router = make(num_experts=4, k=2).train()
    torch.manual_seed(6)
    route(router, torch.randn(16, D)).aux[loss].backward()
    assert router.weight.grad.abs().sum() > 0 and router.noise_weight.grad.abs().sum() > 0


def test_masked_experts_are_never_chosen_get_no_probability_and_no_load():
    router = make(num_experts=5, k=2).train()
    with torch.no_grad():
        router.weight[3:].mul_(50.0)  # the masked experts would win otherwise
    x = torch.randn(40, D)
    allowed = torch.ones(40, 5, dtype=torch.bool)
    allowed[:20, 3:] = False  # the first tokens keep only experts 0, 1, 2
    allowed[20:30, 2:] = False  # these keep exactly k=2: always chosen
    r = route(router, x, allowed=allowed)
    assert not (r.expert_index[:20] >= 3).any() and (r.expert_index[30:] >= 3).any()
    assert (r.probs[~allowed] == 0).all() and torch.isfinite(r.weight).all()
    assert r.expert_index[20:30].sort(-1).values.tolist() == [[0, 1]] * 10
    p = load_probability(x @ router.weight.t(), r.logits, router.noise_std(x), 2, allowed=allowed)
    assert (p[~allowed] == 0).all() and (p[20:30, :2] == 1).all()
    assert all(torch.isfinite(v) for v in r.aux.values())


def test_keep_experts_prunes_both_gate_and_noise_weights():
    router = make(num_experts=5, k=2).eval()
    x = torch.randn(12, D)
    full_weight, full_noise = router.weight.detach().clone(), router.noise_weight.detach().clone()
    keep = torch.tensor([4, 0, 2])
    router.keep_experts(keep)
    assert router.num_experts == 3
    torch.testing.assert_close(router.weight, full_weight[keep])
    torch.testing.assert_close(router.noise_weight, full_noise[keep])
    want = noisy_top_k_gating(x @ full_weight[keep].t(), F.softplus(x @ full_noise[keep].t()) + 1e-2, 2)
    got = route(router, x)
    assert torch.equal(got.expert_index, want.expert_index)
    torch.testing.assert_close(got.aux["noisy_load"], want.aux["noisy_load"])


def test_the_layer_returns_the_routers_losses_beside_its_own():
    torch.manual_seed(7)
    layer = build_moe_layer(dim=D, hidden=H, num_experts=4, router="noisy_top_k", k=2).eval()
    x = torch.randn(3, 5, D)
    out = layer(x)
    assert set(out.aux_losses) - set(AUX_LOSSES) == LOSSES
    own = route(layer.router, x.reshape(-1, D)).aux
    for name in LOSSES:
        torch.testing.assert_close(out.aux_losses[name], own[name])
    layer.train()
    out = layer(x)
    assert LOSSES <= set(out.aux_losses) and all(torch.isfinite(out.aux_losses[n]) for n in LOSSES)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_dropless_dispatch_equals_a_naive_loop(training, activation):
    torch.manual_seed(8)
    layer = build_moe_layer(dim=D, hidden=H, num_experts=5, router="noisy_top_k", k=2, activation=activation)
    layer.train(training)
    x = torch.randn(23, D)
    out = layer(x)
    rec = out.record
    ref = naive_moe(x, rec.expert_index, rec.weight, rec.valid, layer.experts)
    torch.testing.assert_close(out.x, ref, rtol=1e-5, atol=1e-5)
    params = [layer.experts.w_in, layer.experts.w_out, layer.router.weight]
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out.x, params, g, retain_graph=True)
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


NOISY_WEIGHTS = "train.aux_weights={load_balance: 0, z_loss: 0, importance: 0.01, noisy_load: 0.01}"


def test_a_config_weighting_the_noisy_losses_validates_and_trains(tmp_path):
    cfg = get_preset("tiny/token-choice", overrides=["model.moe.router=noisy_top_k", NOISY_WEIGHTS, "train.epochs=1"])
    assert cfg.train.aux_weights == {"load_balance": 0, "z_loss": 0, "importance": 0.01, "noisy_load": 0.01}
    result = Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert result.steps >= 1
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert train and all(0 <= x[f"aux/{n}"] < float("inf") for x in train for n in LOSSES)


def test_weighting_noisy_load_with_a_router_that_does_not_compute_it_is_refused():
    with pytest.raises(ConfigError, match="noisy_load"):
        get_preset("tiny/token-choice", overrides=[NOISY_WEIGHTS])
