"""The modality-combination router (Flex-MoE's S-Router): routes depend on each sample's set of
present modalities, read from its own tokens only; at initialisation "bias" mode is token
choice; "sample" mode reads no token content; masks, pruning, dispatch and a model's step."""

import pytest
import torch
import torch.nn.functional as F

from modalmoe.config import ModelConfig
from modalmoe.data.tasks import load_task
from modalmoe.model import build_model
from modalmoe.moe import build_moe_layer, routers
from modalmoe.moe.routers.modality_combination import present_sets
from modalmoe.run import head_outputs
from test_moe_oracles import naive_moe  # the per-expert loop every dispatch oracle shares

D, H, E = 16, 24, 8
MODALITIES = ("image", "text", "audio")


def make(mode="bias", seed=0, perturb=False, **kw):
    torch.manual_seed(seed)
    router = routers.create("modality_combination", dim=D, num_experts=E, modalities=MODALITIES, mode=mode, **kw)
    if perturb:  # a trained-looking MLP: its bias is no longer 0
        with torch.no_grad():
            router.combo_out.normal_(std=1.0)
            router.combo_out_bias.normal_(std=0.5)
    return router.eval()


def batch(seed=1):
    """Five samples with ids 7, 3, 12, 0, 5 (unsorted, not contiguous), their tokens interleaved.

    Present sets: 7 {image, text}, 3 {image}, 12 {image, text}, 0 {audio}, 5 {image, text, audio}.
    """
    sample = torch.tensor([7, 3, 7, 12, 0, 5, 12, 7, 5, 3, 5, 0, 12])
    modality = torch.tensor([0, 0, 1, 1, 2, 0, 0, 1, 1, 0, 2, 2, 1])
    x = torch.randn(len(sample), D, generator=torch.Generator().manual_seed(seed))
    return x, modality, sample


def rows(sample, sid):
    return (sample == sid).nonzero().squeeze(1)


def combination_of(router, x, modality, sample):
    """[T, E] the combination part of each token's logits (bias mode: logits - W x)."""
    return router(x, modality, sample).logits - x @ router.weight.t()


# --- the present set and the combination bias ----------------------------------------------------


def test_present_sets_are_read_from_each_samples_tokens():
    _, modality, sample = batch()
    present, row = present_sets(modality, sample, 3)
    # Rows follow the sorted distinct ids 0, 3, 5, 7, 12.
    assert present.tolist() == [
        [False, False, True],
        [True, False, False],
        [True, True, True],
        [True, True, False],
        [True, True, False],
    ]
    assert torch.equal(torch.tensor([0, 3, 5, 7, 12])[row], sample)


def test_same_present_set_gets_the_same_bias_and_different_sets_differ():
    router = make(perturb=True)
    x, modality, sample = batch()
    bias = combination_of(router, x, modality, sample)
    for sid in sample.unique().tolist():  # one bias per sample, on each of its tokens
        r = rows(sample, sid)
        torch.testing.assert_close(bias[r], bias[r[:1]].expand(len(r), E))
    same = bias[rows(sample, 7)[0]], bias[rows(sample, 12)[0]]  # both {image, text}
    torch.testing.assert_close(*same)
    sets = {sid: bias[rows(sample, sid)[0]] for sid in (3, 0, 5, 7)}  # four different sets
    for a in sets:
        for b in sets:
            if a < b:
                assert (sets[a] - sets[b]).abs().max() > 1e-2, (a, b)


def test_sample_mode_gives_every_token_of_a_sample_its_combinations_experts():
    router = make("sample")
    x, modality, sample = batch()
    out = router(x, modality, sample)
    for sid in sample.unique().tolist():
        r = rows(sample, sid)
        assert torch.equal(out.expert_index[r], out.expert_index[r[:1]].expand(len(r), -1))
        assert torch.equal(out.weight[r], out.weight[r[:1]].expand(len(r), -1))
    first = {sid: rows(sample, sid)[0] for sid in (7, 12, 3, 0, 5)}
    assert torch.equal(out.expert_index[first[7]], out.expert_index[first[12]])  # the same set
    # Four different sets: their logits differ, and not all four pick the same experts.
    logits = torch.stack([out.logits[first[s]] for s in (3, 0, 5, 7)])
    assert torch.cdist(logits, logits).add(torch.eye(4)).min() > 1e-2
    picks = {tuple(sorted(out.expert_index[first[s]].tolist())) for s in (3, 0, 5, 7)}
    assert len(picks) > 1


# --- a route never reads what its sample does not have -----------------------------------------


def test_sample_mode_reads_no_token_content():
    router = make("sample")
    x, modality, sample = batch()
    a = router(x, modality, sample)
    b = router(torch.randn_like(x) * 100, modality, sample)
    for name in ("expert_index", "weight", "probs", "logits"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not hasattr(router, "weight")  # no token gate to read them with
    # ... while the modalities do change it (the test can fail): sample 3 gains text.
    c = router(x, torch.where(sample == 3, 1, modality), sample)
    assert not torch.equal(c.logits[sample == 3], a.logits[sample == 3])


@pytest.mark.parametrize("mode", ["bias", "sample"])
def test_changing_one_samples_tokens_never_changes_another_samples_route(mode):
    router = make(mode, perturb=True)
    x, modality, sample = batch()
    a = router(x, modality, sample)
    other = sample != 7
    x2 = x.clone()
    x2[sample == 7] = torch.randn(int((sample == 7).sum()), D) * 10
    b = router(x2, modality, sample)
    assert torch.equal(a.expert_index[other], b.expert_index[other])
    torch.testing.assert_close(a.logits[other], b.logits[other], rtol=1e-6, atol=1e-6)
    if mode == "bias":  # sample 7's own route reads its tokens (the test can fail)
        assert not torch.allclose(a.logits[sample == 7], b.logits[sample == 7])


@pytest.mark.parametrize("mode", ["bias", "sample"])
def test_adding_a_modality_to_a_sample_changes_only_that_samples_combination(mode):
    router = make(mode, perturb=True)
    x, modality, sample = batch()
    before = router(x, modality, sample)
    # Sample 3 ({image}) gains an audio token, appended last.
    x2 = torch.cat([x, torch.randn(1, D)])
    modality2, sample2 = torch.cat([modality, torch.tensor([2])]), torch.cat([sample, torch.tensor([3])])
    after = router(x2, modality2, sample2)
    old = torch.arange(len(sample))
    if mode == "bias":
        bias_before = combination_of(router, x, modality, sample)
        bias_after = combination_of(router, x2, modality2, sample2)[old]
    else:
        bias_before, bias_after = before.logits, after.logits[old]
    gained = sample == 3
    torch.testing.assert_close(bias_after[~gained], bias_before[~gained], rtol=1e-6, atol=1e-6)
    assert torch.equal(after.expert_index[old][~gained], before.expert_index[~gained])
    assert (bias_after[gained] - bias_before[gained]).abs().max() > 1e-2
    # Its new set is {image, audio}: it now shares no bias with the image-only ones.
    present, _ = present_sets(modality2, sample2, 3)
    assert present[1].tolist() == [True, False, True]


# --- initialisation, masks, sample ids -----------------------------------------------------------


@pytest.mark.parametrize("gating", ["softmax", "sigmoid", "laplace"])
@pytest.mark.parametrize("normalize", [True, False])
def test_at_init_bias_mode_is_token_choice_with_the_same_weight(gating, normalize):
    router = make(gating=gating, normalize=normalize)
    torch.manual_seed(5)
    token = routers.create("token_choice", dim=D, num_experts=E, k=2, gating=gating, normalize=normalize).eval()
    with torch.no_grad():
        token.weight.copy_(router.weight)
    x, modality, sample = batch()
    ours, theirs = router(x, modality, sample), token(x, modality, sample)
    for name in ("expert_index", "weight", "probs", "logits"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    present, _ = present_sets(modality, sample, 3)
    assert torch.equal(router.combination_logits(present), torch.zeros(len(present), E))
    # A trained MLP moves it away from token choice (the test can fail).
    assert not torch.equal(
        make(gating=gating, normalize=normalize, perturb=True)(x, modality, sample).logits, ours.logits
    )


@pytest.mark.parametrize("mode", ["bias", "sample"])
def test_expert_mask_is_respected(mode):
    router = make(mode, perturb=True)
    x, modality, sample = batch()
    free = router(x, modality, sample)
    allowed = torch.ones(len(sample), E, dtype=torch.bool)
    allowed[torch.arange(len(sample)), free.expert_index[:, 0]] = False  # forbid each token's first choice
    allowed[:, E - 1] = False
    masked = router(x, modality, sample, allowed=allowed)
    assert allowed.gather(1, masked.expert_index).all()
    assert (masked.probs[~allowed] == 0).all()
    torch.testing.assert_close(masked.probs.sum(-1), torch.ones(len(sample)))
    assert router.accepts_mask


@pytest.mark.parametrize("mode", ["bias", "sample"])
def test_unsorted_non_contiguous_sample_ids_route_as_each_sample_alone(mode):
    router = make(mode, perturb=True)
    x, modality, sample = batch()
    together = router(x, modality, sample)
    relabelled = router(x, modality, torch.unique(sample, return_inverse=True)[1] * 3 + 1)
    assert torch.equal(together.expert_index, relabelled.expert_index)
    torch.testing.assert_close(together.logits, relabelled.logits, rtol=1e-6, atol=1e-6)
    for sid in sample.unique().tolist():
        r = rows(sample, sid)
        alone = router(x[r], modality[r], torch.zeros(len(r), dtype=torch.long))
        assert torch.equal(alone.expert_index, together.expert_index[r]), sid
        torch.testing.assert_close(alone.logits, together.logits[r], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["bias", "sample"])
def test_keep_experts_keeps_the_same_rows_of_every_per_expert_parameter(mode):
    router = make(mode, perturb=True)
    x, modality, sample = batch()
    before = router(x, modality, sample).logits
    keep = torch.tensor([6, 1, 3, 4])
    router.keep_experts(keep)
    assert router.num_experts == 4
    torch.testing.assert_close(router(x, modality, sample).logits, before[:, keep], rtol=1e-6, atol=1e-6)
    assert set(router.expert_params) == (
        {"weight", "combo_out", "combo_out_bias"} if mode == "bias" else {"combo_out", "combo_out_bias"}
    )


# --- inside the MoE layer and a model --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bias", "sample"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_dropless_dispatch_equals_naive_loop(mode, activation):
    torch.manual_seed(1)
    layer = build_moe_layer(
        dim=D,
        hidden=H,
        num_experts=6,
        router="modality_combination",
        activation=activation,
        modalities=MODALITIES,
        k=2,
        mode=mode,
    )
    x, modality, sample = torch.randn(37, D, requires_grad=True), torch.randint(0, 3, (37,)), torch.randint(0, 9, (37,))
    out = layer(x, modality, sample)
    rec = out.record
    assert rec.valid.all() and not rec.dropped.any()
    ref = naive_moe(x.detach(), rec.expert_index, rec.weight.detach(), rec.valid, layer.experts)
    torch.testing.assert_close(out.x, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    params = [layer.experts.w_in, layer.experts.w_out]
    grads = torch.autograd.grad(out.x, params, g, retain_graph=True)
    for a, b in zip(grads, torch.autograd.grad(ref, params, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_model_with_the_router_trains_a_step_on_a_task_with_missing_modalities():
    task = load_task("synthetic", num_samples=120, num_modalities=2, dim=8, missing=0.4)
    config = ModelConfig(
        dim=16, depth=2, heads=2, hidden=32, moe={"every": 1, "num_experts": 4, "router": "modality_combination"}
    )
    torch.manual_seed(0)
    model = build_model(config, task.specs, outputs=head_outputs(task.train)).fit(task.train).train()
    some = [i for i in range(len(task.train)) if task.train.present["m0"][i] or task.train.present["m1"][i]][:32]
    b = task.train.batch(some)
    sets = {(bool(p0), bool(p1)) for p0, p1 in zip(b.present["m0"], b.present["m1"], strict=True)}
    assert sets == {(True, True), (True, False), (False, True)}  # every combination is in the batch
    layers = [m for m in model.modules() if type(m).__name__ == "ModalityCombinationRouter"]
    assert len(layers) == 2 and all(r.modalities == ("m0", "m1") for r in layers)  # filled in by the builder
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    out = model(b)
    loss = F.cross_entropy(out.logits, b.target) + sum(out.aux_losses.values(), torch.zeros(()))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(r.combo_out.grad.abs().sum() > 0 for r in layers)
    optimizer.step()
    # After the step each combination has its own bias.
    present = torch.tensor([[True, True], [True, False], [False, True]])
    with torch.no_grad():
        bias = layers[0].combination_logits(present)
    assert torch.cdist(bias, bias).add(torch.eye(3)).min() > 0
    with torch.no_grad():
        again = model(b)
    assert torch.isfinite(again.logits).all()


# --- configuration errors ------------------------------------------------------------------------


def test_bad_options_give_clear_errors():
    kw = dict(dim=D, num_experts=E, modalities=MODALITIES)
    with pytest.raises(ValueError, match="unknown mode 'tokens'"):
        routers.create("modality_combination", mode="tokens", **kw)
    for k in (0, E + 1):
        with pytest.raises(ValueError, match="k must be between 1 and num_experts"):
            routers.create("modality_combination", k=k, **kw)
    with pytest.raises(ValueError, match="at least one modality"):
        routers.create("modality_combination", dim=D, num_experts=E, modalities=())
    with pytest.raises(ValueError, match="reads no tokens"):
        routers.create("modality_combination", mode="sample", gating="laplace", **kw)
    with pytest.raises(ValueError, match="reads none"):
        routers.create("modality_combination", mode="sample", jitter_eps=0.1, **kw)
    with pytest.raises(ValueError, match="hidden must be >= 1"):
        routers.create("modality_combination", hidden=0, **kw)
    with pytest.raises(ValueError, match="unknown gating"):
        routers.create("modality_combination", gating="tanh", **kw)
    router = make()
    with pytest.raises(ValueError, match=r"modality ids must be in \[0, 3\)"):
        router(torch.randn(2, D), torch.tensor([0, 3]), torch.zeros(2, dtype=torch.long))
