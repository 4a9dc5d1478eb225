"""Transformer trunk with dense or MoE blocks: padding, batch independence, aux losses."""

from __future__ import annotations

import pytest
import torch

from modalmoe.model import Trunk, TrunkShape
from modalmoe.moe import routers


def router_kwargs(name: str) -> dict:
    if name in ("modality_experts", "per_modality", "hierarchical", "modality_combination"):
        return {"modalities": ("a", "b")}
    if name == "token_choice":
        return {"k": 2}
    if name in ("per_task", "task_film"):
        return {"tasks": ("only",)}
    return {}


def make(router: str | None, seed: int = 0) -> Trunk:
    torch.manual_seed(seed)
    moe = None if router is None else {"num_experts": 4, "router": router, **router_kwargs(router)}
    return Trunk(TrunkShape(dim=16, depth=2, heads=2, hidden=32, moe_every=1 if router else 0, moe=moe)).eval()


def inputs(batch: int = 3, length: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, 16, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, 4:] = False
    modality = (torch.arange(length) >= length // 2).long().expand(batch, length)
    return x, mask, modality


@pytest.mark.parametrize("router", [None, *routers.names()])
def test_trunk_runs_forward_backward_and_collects_routing(router):
    trunk = make(router).train()
    x, mask, modality = inputs()
    out = trunk(x.requires_grad_(), mask, modality)
    assert out.x.shape == x.shape and (out.x[~mask] == 0).all()
    assert len(out.records) == (0 if router is None else 2)
    loss = out.x.square().sum() + sum(out.aux_losses.values(), torch.zeros(()))
    loss.backward()
    assert x.grad[mask].abs().sum() > 0 and (x.grad[~mask] == 0).all()


@pytest.mark.parametrize("router", [None, "token_choice", "soft", "modality_experts", "per_modality"])
def test_padding_content_does_not_change_real_outputs(router):
    trunk = make(router)
    x, mask, modality = inputs()
    noisy = x.clone()
    noisy[~mask] = 1e3
    torch.testing.assert_close(trunk(x, mask, modality).x, trunk(noisy, mask, modality).x)


@pytest.mark.parametrize("router", [None, "token_choice", "soft", "modality_experts", "per_modality"])
def test_a_sample_does_not_depend_on_its_batch_or_its_order(router):
    """True for per-token and per-sample routers; expert-choice and capacity limits
    compete across the batch by design and are left out."""
    trunk = make(router)
    x, mask, modality = inputs(batch=4)
    full = trunk(x, mask, modality).x
    order = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(trunk(x[order], mask[order], modality[order]).x, full[order], atol=1e-5, rtol=1e-5)
    for i in range(4):
        one = trunk(x[i : i + 1], mask[i : i + 1], modality[i : i + 1]).x
        torch.testing.assert_close(one[0], full[i], atol=1e-5, rtol=1e-5)


def test_a_sample_without_tokens_is_a_clear_error():
    x, mask, modality = inputs()
    mask[2] = False
    with pytest.raises(ValueError, match=r"samples \[2\] have no tokens"):
        make("token_choice")(x, mask, modality)


def test_moe_every_places_moe_blocks_and_validates():
    trunk = Trunk(TrunkShape(dim=16, depth=4, heads=2, hidden=32, moe_every=2, moe={"num_experts": 4}))
    kinds = [type(b.ffn).__name__ for b in trunk.blocks]
    assert kinds == ["FeedForward", "MoELayer", "FeedForward", "MoELayer"]
    with pytest.raises(ValueError, match="moe_every > 0 needs moe="):
        Trunk(TrunkShape(dim=16, depth=2, heads=2, hidden=32, moe_every=1))
    with pytest.raises(ValueError, match="multiple of heads"):
        Trunk(TrunkShape(dim=15, depth=1, heads=2, hidden=32))
