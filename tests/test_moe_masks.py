"""Expert masks (moe/masks.py): experts reserved for a modality or a task are never chosen by
others, in every router that takes a mask; the mask is an input of the pass (no router state);
reservations are validated; old configs that kept them in router_options are migrated."""

import pytest
import torch

from modalmoe.config import CONFIG_VERSION, ExperimentConfig, migrate, validate
from modalmoe.moe import build_moe_layer
from modalmoe.moe.routers import routers

D, E = 8, 6
MASKED = [name for name in routers.names() if routers.get(name).accepts_mask]
OPTIONS = {
    "per_modality": {"modalities": ("a", "b")},
    "expert_choice": {"experts_per_token": 2.0},
    "per_task": {"tasks": ("t1", "t2")},
    "task_film": {"tasks": ("t1", "t2")},
    "modality_combination": {"modalities": ("a", "b")},
}


def layer(router, seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_moe_layer(
        dim=D, hidden=16, num_experts=E, router=router, k=2, router_options=OPTIONS.get(router), **kwargs
    )


def favour_last_two(moe):
    """Make the reserved experts 4 and 5 score highest for every token."""
    router = moe.router
    with torch.no_grad():
        for name, dim in router.expert_params.items():
            getattr(router, name).narrow(dim, 4, 2).mul_(50.0)


def chosen(record):
    """[T, E] whether each token was routed to each expert (a choice that was made)."""
    out = torch.zeros(record.probs.shape, dtype=torch.bool)
    rows = torch.arange(record.expert_index.shape[0]).unsqueeze(1).expand_as(record.expert_index)
    out[rows[record.valid], record.expert_index[record.valid]] = True
    return out


def test_the_masked_routers_are_the_top_k_routers():
    assert set(MASKED) == {
        "token_choice",
        "expert_choice",
        "per_modality",
        "per_task",
        "task_film",
        "top_p",
        "noisy_top_k",
        "modality_combination",
    }


@pytest.mark.parametrize("router", MASKED)
def test_experts_reserved_for_a_modality_are_never_chosen_by_another(router):
    moe = layer(router, reserved={"modality": (("a", "b"), {"b": [4, 5]})})
    favour_last_two(moe)
    x, modality = torch.randn(200, D), torch.arange(200) % 2
    task = {"task": torch.arange(200) % 2} if moe.router.accepts_task else {}  # routers over two tasks need ids
    record = moe(x, modality=modality, **task).record
    picked = chosen(record)
    assert not picked[modality == 0][:, 4:].any()
    assert picked[modality == 1][:, 4:].any()
    assert (record.probs[modality == 0][:, 4:] == 0).all()


@pytest.mark.parametrize("router", MASKED)
def test_experts_reserved_for_a_task_are_used_only_by_that_task(router):
    moe = layer(router, reserved={"task": (("t1", "t2"), {"t2": [4, 5]})})
    favour_last_two(moe)
    x, modality = torch.randn(200, D), torch.zeros(200, dtype=torch.long)
    state = {k: v.clone() for k, v in moe.state_dict().items()}
    attributes = dict(vars(moe.router))
    later = moe(x, modality=modality, task=torch.ones(200, dtype=torch.long)).record
    earlier = moe(x, modality=modality, task=torch.zeros(200, dtype=torch.long)).record
    assert chosen(later)[:, 4:].any()
    assert not chosen(earlier)[:, 4:].any() and (earlier.probs[:, 4:] == 0).all()
    # The task is an input of the pass: no router attribute or tensor changed.
    assert dict(vars(moe.router)) == attributes
    assert all(torch.equal(v, state[k]) for k, v in moe.state_dict().items())
    with pytest.raises(ValueError, match="needs each token's task id"):
        moe(x, modality=modality)


@pytest.mark.parametrize("router", MASKED)
def test_without_reservations_routing_is_bit_identical_to_the_plain_layer(router):
    x, modality = torch.randn(50, D), torch.arange(50) % 2
    plain, empty = layer(router, seed=1), layer(router, seed=1, reserved={"modality": (("a", "b"), {})})
    assert not empty.masks
    task = {"task": torch.arange(50) % 2} if plain.router.accepts_task else {}
    torch.manual_seed(2)  # the same noise for routers that draw some in training (noisy top-k)
    a = plain(x, modality=modality, **task)
    torch.manual_seed(2)
    b = empty(x, modality=modality, **task)
    assert torch.equal(a.x, b.x) and torch.equal(a.record.expert_index, b.record.expert_index)
    assert torch.equal(a.record.valid, b.record.valid) and torch.equal(a.record.weight, b.record.weight)


@pytest.mark.parametrize(
    ("reserved", "match"),
    [
        ({"modality": (("a", "b"), {"c": [4]})}, "not among the model's"),
        ({"modality": (("a", "b"), {"b": [6]})}, r"outside \[0, 6\)"),
        ({"modality": (("a", "b"), {"a": [3], "b": [3]})}, "reserved for both"),
        ({"modality": (("a", "b"), {"b": [1, 2, 3, 4, 5]})}, "fewer than the 2 the router chooses"),
        ({"modality": (("m",), {"m": [4]}), "task": (("a", "b"), {"b": [4, 5]})}, "reserved both by modality"),
        ({"task": (("a",), {"b": [4]})}, r"task \['b'\], which is not among"),
    ],
)
def test_reservations_are_validated(reserved, match):
    with pytest.raises(ValueError, match=match):
        layer("token_choice", reserved=reserved)


def test_a_router_without_mask_support_refuses_reservations_by_name():
    with pytest.raises(ValueError, match="does not take an expert mask.*token_choice"):
        build_moe_layer(dim=D, hidden=16, num_experts=E, router="soft", reserved={"modality": (("a",), {"a": [5]})})
    with pytest.raises(Exception, match="model.moe.reserved needs a router that takes an expert mask"):
        validate(
            {"task": "tiny", "model": {"moe": {"every": 1, "router": "soft", "reserved": {"modalities": {"a": [5]}}}}}
        )


def test_a_version_1_config_is_migrated_on_load():
    old = {
        "task": "tiny",
        "model": {
            "moe": {
                "every": 1,
                "num_experts": 6,
                "router_options": {"reserved": {"m2": [4]}, "reserved_tasks": {"t2": [5]}, "tasks": ["t1", "t2"]},
            }
        },
    }
    config = ExperimentConfig.model_validate(old)
    assert config.version == CONFIG_VERSION
    assert config.model.moe.reserved.modalities == {"m2": [4]} and config.model.moe.reserved.tasks == {"t2": [5]}
    assert config.model.moe.router_options == {}
    assert old["model"]["moe"]["router_options"]["reserved"] == {"m2": [4]}  # the input is not changed
    choice = {"task": "tiny", "model": {"moe": {"router": "expert_choice", "router_options": {"capacity_factor": 1.5}}}}
    assert ExperimentConfig.model_validate(choice).model.moe.router_options == {"experts_per_token": 1.5}
    # A current config passes through unchanged, and its dump round-trips.
    assert ExperimentConfig.model_validate(config.model_dump(mode="json")) == config
    assert migrate(config.model_dump(mode="json")) == config.model_dump(mode="json")
    with pytest.raises(Exception, match=f"newer than this modalmoe's {CONFIG_VERSION}; upgrade"):
        validate({"task": "tiny", "version": CONFIG_VERSION + 1})
