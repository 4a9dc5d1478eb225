"""Oracle tests: the MoE engine against references that are obviously right."""

import pytest
import torch
import torch.nn.functional as F

from modalmoe.moe import (
    ExpertBank,
    FeedForward,
    GroupedLayout,
    MoELayer,
    build_moe_layer,
    grouped_ffn,
    grouped_gemm,
    routers,
)

D, H = 16, 24


def naive_moe(x, expert_index, weight, valid, bank: ExpertBank):
    """The per-expert loop a reader can check by eye (Hugging Face Mixtral style)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(expert_index.shape[1]):
            if not valid[t, j]:
                continue
            e = int(expert_index[t, j])
            h = x[t] @ bank.w_in[e]
            if bank.activation == "swiglu":
                g, u = h.chunk(2)
                a = F.silu(g) * u
            else:
                a = F.gelu(h)
            out[t] = out[t] + weight[t, j] * (a @ bank.w_out[e])
    return out


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_one_expert_moe_equals_dense_ffn(activation):
    torch.manual_seed(0)
    layer = build_moe_layer(dim=D, hidden=H, num_experts=1, k=1, activation=activation)
    dense = FeedForward(dim=D, hidden=H, activation=activation)
    with torch.no_grad():
        dense.w_in.weight.copy_(layer.experts.w_in[0].t())
        dense.w_out.weight.copy_(layer.experts.w_out[0].t())
    x = torch.randn(2, 7, D, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out = layer(x).x
    ref = dense(x2)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.experts.w_in.grad[0], dense.w_in.weight.grad.t())
    torch.testing.assert_close(layer.experts.w_out.grad[0], dense.w_out.weight.grad.t())


# Routers whose Routing has no discrete assignment (``Routing.soft`` is set: soft MoE mixes
# tokens into slots), so there is no per-expert loop to compare with. The Router classes do not
# declare this, so the list is explicit; test_the_oracle_covers_every_discrete_router checks it.
NOT_DISCRETE = {"soft"}
DISCRETE = [name for name in routers.names() if name not in NOT_DISCRETE]
MODALITIES = ("image", "text")
# The options each router needs (a router not listed is built with its defaults).
ORACLE_ROUTER_KWARGS = {
    "token_choice": {"k": 2},
    "expert_choice": {"experts_per_token": 1.5},
    "modality_experts": {"modalities": MODALITIES, "k": 2},
    "per_modality": {"modalities": MODALITIES, "k": 2},
    "hierarchical": {"modalities": MODALITIES, "groups": 2, "k": 2},
    "per_task": {"tasks": ("only",), "k": 2},
    "task_film": {"tasks": ("only",), "k": 2},
    "modality_combination": {"modalities": MODALITIES, "k": 2},
    "top_p": {"p": 0.8, "null_experts": 2},  # invalid (null) choices reach the oracle too
}


def _router_kwargs(name):
    return ORACLE_ROUTER_KWARGS.get(name, {})


def test_the_oracle_covers_every_discrete_router():
    """Every registered router is either in the dispatch oracle or excluded because its routing
    is soft (no discrete assignment)."""
    torch.manual_seed(0)
    x, modality = torch.randn(10, D), torch.randint(0, 2, (10,))
    for name in routers.names():
        router = routers.create(name, dim=D, num_experts=6, **_router_kwargs(name))
        routing = router(x, modality, torch.zeros(10, dtype=torch.long))
        assert (routing.soft is None) == (name in DISCRETE), name


@pytest.mark.parametrize("name", DISCRETE)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_dropless_dispatch_equals_naive_loop(name, activation):
    torch.manual_seed(1)
    layer = build_moe_layer(dim=D, hidden=H, num_experts=6, router=name, activation=activation, **_router_kwargs(name))
    x = torch.randn(37, D, requires_grad=True)
    modality = torch.randint(0, 2, (37,))
    out = layer(x, modality)
    rec = out.record
    x2 = x.detach().clone().requires_grad_()
    ref = naive_moe(x2, rec.expert_index, rec.weight.detach(), rec.valid, layer.experts)
    torch.testing.assert_close(out.x, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out.x, [layer.experts.w_in, layer.experts.w_out], g, retain_graph=True)
    ref_grads = torch.autograd.grad(ref, [layer.experts.w_in, layer.experts.w_out], g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("backend", "rows"),
    [("mkl", None), ("mkl-mixed", None), ("blocks", None), ("blocks", 0), ("blocks", 3), ("blocks", 50)],
)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_kernel_every_backend_matches_per_expert_matmuls(backend, rows, activation, monkeypatch):
    """MKL's grouped GEMM (alone, or mixed with torch.mm for large segments), the padded block,
    its tails and the pure loop all agree."""
    if backend.startswith("mkl") and not grouped_gemm.available(torch.ones(1)):
        pytest.skip("this PyTorch build does not export MKL's cblas_sgemm_batch")
    if backend == "blocks":
        monkeypatch.setattr(grouped_gemm, "available", lambda *t: False)
    if backend == "mkl-mixed":  # segments of >= 5 rows' work (7 and 11 rows) take the torch.mm path
        monkeypatch.setattr(grouped_gemm, "LARGE_WORK", 5 * D * H)
    torch.manual_seed(2)
    bank = ExpertBank(num_experts=5, dim=D, hidden=H, activation=activation)
    counts = [0, 7, 2, 11, 4]
    x = torch.randn(sum(counts), D, requires_grad=True)
    gate = torch.rand(sum(counts), requires_grad=True)
    layout = GroupedLayout.plan(counts, rows=rows)
    y = grouped_ffn(x, bank.w_in, bank.w_out, layout, activation, gate)
    ref, start = [], 0
    for e, c in enumerate(counts):
        h = x[start : start + c] @ bank.w_in[e]
        a = F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1] if activation == "swiglu" else F.gelu(h)
        ref.append(a @ bank.w_out[e])
        start += c
    ref = torch.cat(ref) * gate.unsqueeze(-1)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, gate, bank.w_in, bank.w_out], g)
    want = torch.autograd.grad(ref, [x, gate, bank.w_in, bank.w_out], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["mkl", "blocks"])
def test_grouped_kernel_gathers_rows_by_index_like_index_select(backend, monkeypatch):
    """``index=`` (rows gathered inside, tokens used twice) equals gathering outside."""
    if backend == "blocks":
        monkeypatch.setattr(grouped_gemm, "available", lambda *t: False)
    torch.manual_seed(4)
    bank = ExpertBank(num_experts=3, dim=D, hidden=H, activation="gelu")
    counts = [5, 0, 9]
    tokens = torch.randn(8, D, requires_grad=True)
    index = torch.randint(0, 8, (sum(counts),))
    gate = torch.rand(sum(counts), requires_grad=True)
    layout = GroupedLayout.plan(counts)
    y = grouped_ffn(tokens, bank.w_in, bank.w_out, layout, "gelu", gate, index=index)
    monkeypatch.setattr(grouped_gemm, "available", lambda *t: False)
    ref = grouped_ffn(tokens.index_select(0, index), bank.w_in, bank.w_out, layout, "gelu", gate)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [tokens, gate, bank.w_in, bank.w_out], g)
    want = torch.autograd.grad(ref, [tokens, gate, bank.w_in, bank.w_out], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fallback_layout_cost_model_picks_block_for_balanced_and_tail_for_skew():
    balanced = GroupedLayout.plan([64] * 8).blocks
    assert balanced.rows == 64 and balanced.head_rows is None and not balanced.tails
    skewed = GroupedLayout.plan([500, 10, 12, 9, 11, 10, 8, 10]).blocks
    assert skewed.rows < 500 and [e for e, _, _ in skewed.tails] == [0]


def test_gradients_reach_router_weights():
    for name in routers.names():
        kw = (
            {"modalities": ("a", "b")}
            if name in ("modality_experts", "per_modality", "hierarchical", "modality_combination")
            else {}
        )
        kw = {"tasks": ("only",)} if name in ("per_task", "task_film") else kw
        torch.manual_seed(3)
        layer = build_moe_layer(dim=D, hidden=H, num_experts=4, router=name, **kw)
        x = torch.randn(3, 5, D)
        out = layer(x, torch.randint(0, 2, (3, 5)))
        loss = out.x.square().sum() + sum(out.aux_losses.values())
        loss.backward()
        # modality_combination's bias MLP starts at exactly 0 (the router starts as token choice),
        # so its first layer gets no gradient at step 0; its last layer does.
        grads = [p.grad for n, p in layer.router.named_parameters() if n not in ("scale", "combo_in", "combo_in_bias")]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_shared_experts_add_a_dense_ffn():
    torch.manual_seed(4)
    layer = build_moe_layer(dim=D, hidden=H, num_experts=4, shared_experts=2, k=1)
    x = torch.randn(9, D)
    out = layer(x).x
    routed = MoELayer(router=layer.router, experts=layer.experts)(x).x
    torch.testing.assert_close(out, routed + layer.shared(x))
    assert layer.shared.w_out.in_features == 2 * H


def test_padding_mask_tokens_are_not_routed_and_output_zero():
    torch.manual_seed(5)
    layer = build_moe_layer(dim=D, hidden=H, num_experts=4, k=2)
    x = torch.randn(2, 6, D)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = layer(x, mask=mask)
    assert out.record.expert_index.shape[0] == 10
    assert torch.all(out.x[0, 4:] == 0)
    # Real tokens do not depend on what sits in the padding.
    x2 = x.clone()
    x2[0, 4:] = 100.0
    torch.testing.assert_close(layer(x2, mask=mask).x, out.x)
