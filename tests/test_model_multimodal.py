"""The multimodal model: every fusion and preset runs; absent modalities are handled, not faked;
per-token routing makes a sample's output independent of its batch."""

import json

import pytest
import torch
import torch.nn.functional as F

from modalmoe.config import ModelConfig
from modalmoe.data.tasks import load_task
from modalmoe.efficiency import expert_row_flops, measure_cost
from modalmoe.model import build_model, fusions, modality_dropout
from modalmoe.model.presets import get_preset, preset_names
from modalmoe.run import head_outputs

FUSIONS = fusions.names()
# Routers whose decision for a token depends only on that token (soft MoE: only on its sample).
PER_TOKEN = {
    "token_choice": {},
    "modality_experts": {"k": 1},
    "per_modality": {},
    "hierarchical": {"router_options": {"groups": 2}},
    "soft": {"k": 1},
}


@pytest.fixture(scope="module")
def av():
    return load_task("av-digits")


def small(fusion="early", router=None, **extra) -> ModelConfig:
    moe = {"every": 1, "num_experts": 4, "router": router, **PER_TOKEN.get(router, {})} if router else {}
    return ModelConfig(
        dim=16,
        depth=2,
        heads=2,
        hidden=32,
        fusion={"name": fusion},
        moe=moe,
        encoders={"image": {"options": {"patch": 7, "stem_channels": 4}}, "audio": {"options": {"patch": 2}}},
        **extra,
    )


def make(av, config, seed=0):
    torch.manual_seed(seed)
    return build_model(config, av.specs, outputs=10).fit(av.train).eval()


def backward_ok(model, batch):
    model.train()
    out = model(batch)
    loss = F.cross_entropy(out.logits, batch.target) + sum(out.aux_losses.values(), torch.zeros(()))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    return out


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("router", [None, "token_choice", "expert_choice", "soft", "modality_experts"])
def test_every_fusion_runs_forward_and_backward(av, fusion, router):
    model = make(av, small(fusion, router, head={"embed_dim": 8}))
    batch = av.train.batch(range(6))
    out = backward_ok(model, batch)
    assert out.logits.shape == (6, 10)
    assert out.pooled.shape == (6, 2, 16) and out.fused.shape == (6, 16)
    assert set(out.embeddings) == {"audio", "image"}
    assert torch.allclose(out.embeddings["audio"].norm(dim=-1), torch.ones(6), atol=1e-5)
    assert len(out.records) == (0 if router is None else 2 * (1 if fusion == "early" else 2))
    if router is not None:
        assert {"load_balance", "z_loss"} <= set(out.aux_losses)
        assert all(torch.isfinite(v) for v in out.aux_losses.values())


@pytest.mark.parametrize("name", [n for n in preset_names() if n.startswith("tiny/")])
def test_every_tiny_preset_runs_forward_and_backward(name):
    cfg = get_preset(name)
    task = load_task(cfg.task, **cfg.task_options)
    torch.manual_seed(0)
    model = build_model(cfg.model, task.specs, outputs=task.train.num_classes).fit(task.train)
    out = backward_ok(model, task.train.batch(range(8)))
    assert out.logits.shape == (8, task.train.num_classes)
    assert (len(out.records) > 0) == (cfg.model.moe.every > 0)


REAL = [n for n in preset_names(tiny=False) if not n.startswith("synthetic/")]


@pytest.fixture(scope="module")
def tasks():
    cache = {}

    def get(cfg):
        key = json.dumps([cfg.task, cfg.task_options], sort_keys=True)  # mixtures differ by options
        if key not in cache:
            task = load_task(cfg.task, **cfg.task_options)
            # every member of a mixture in the slice: a seeded sample of the training split
            rows = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(0))[:300].sort().values
            cache[key] = (task, task.train.subset(rows))
        return cache[key]

    return get


@pytest.mark.parametrize("name", REAL)
def test_every_real_preset_builds_and_trains_one_step(name, tasks):
    cfg = get_preset(name)
    task, train = tasks(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, task.specs, outputs=head_outputs(train)).fit(train)
    out = backward_ok(model, train.batch(range(4)))
    assert out.logits.shape == (4, train.num_classes)


def test_presets_validate_and_name_unknown_parts():
    from modalmoe.config import ConfigError

    assert len(preset_names()) >= 5 * 12
    cfg = get_preset("av-digits/token-choice", overrides=["model.moe.num_experts=16", "model.dim=32"])
    assert cfg.model.moe.num_experts == 16 and cfg.model.dim == 32 and cfg.task == "av-digits"
    assert get_preset("mfeat/modality-experts").model.moe.num_experts == 12  # task adjusts design
    assert get_preset("av-digits/expert-choice").model.moe.router == "expert_choice"  # extends
    with pytest.raises(ConfigError, match="Did you mean 'token-choice'"):
        get_preset("av-digits/token-choise")
    with pytest.raises(ConfigError, match="did you mean num_experts"):
        get_preset("av-digits/token-choice", overrides=["model.moe.num_expert=3"])
    with pytest.raises(ConfigError, match="<task>/<design>"):
        get_preset("token-choice")


# --- missing modalities -----------------------------------------------------------------------


def with_absent(batch, name, rows):
    """The batch with modality ``name`` absent for ``rows`` (its data left in place)."""
    present = dict(batch.present)
    flags = present[name].clone()
    flags[rows] = False
    present[name] = flags
    return type(batch)(inputs=dict(batch.inputs), present=present, target=batch.target, masks=dict(batch.masks))


def scrambled(batch, name, rows):
    inputs = dict(batch.inputs)
    x = inputs[name].clone()
    x[rows] = torch.randn_like(x[rows]) * 100
    inputs[name] = x
    return type(batch)(inputs=inputs, present=batch.present, target=batch.target, masks=dict(batch.masks))


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("strategy", ["mask", "bank"])
def test_data_of_an_absent_modality_changes_no_output(av, fusion, strategy):
    model = make(av, small(fusion, "token_choice", missing={"strategy": strategy}, head={"embed_dim": 8}))
    batch = with_absent(av.test.batch(range(8)), "image", [1, 4, 6])
    with torch.no_grad():
        a, b = model(batch), model(scrambled(batch, "image", [1, 4, 6]))
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.pooled, b.pooled)
    for name in a.embeddings:
        assert torch.equal(a.embeddings[name], b.embeddings[name])
    # ... while the data of a present modality does change them (the test can fail).
    c = model(scrambled(batch, "image", [0]))
    assert not torch.allclose(a.logits[0], c.logits[0])


def test_mask_strategy_gives_absent_modalities_no_tokens_and_the_bank_fills_them(av):
    batch = with_absent(av.test.batch(range(4)), "audio", [0, 2])
    masked = make(av, small("early", "token_choice"))
    with torch.no_grad():
        out = masked(batch)
    assert out.present[:, 0].tolist() == [False, True, False, True]
    audio_tokens = out.records[0].modality == 0
    assert set(out.records[0].sample[audio_tokens].tolist()) == {1, 3}  # no audio token routed for 0, 2
    banked = make(av, small("early", "token_choice", missing={"strategy": "bank", "bank_tokens": 2}))
    with torch.no_grad():
        out = banked(batch)
    assert out.present.all()
    record = out.records[0]
    for sample in (0, 2):
        assert int(((record.sample == sample) & (record.modality == 0)).sum()) == 2  # bank tokens, routed
    # The bank is conditioned on which modalities are present.
    from modalmoe.encoders import Tokens

    with torch.no_grad():
        banked.bank.given.normal_()
        streams = [Tokens(torch.zeros(2, 0, 16), torch.zeros(2, 0, dtype=torch.bool))] * 2
        filled = banked.bank(streams, torch.tensor([[False, True], [False, False]]))
    assert filled[0].mask.all() and filled[0].x.shape == (2, 2, 16)
    assert not torch.allclose(filled[0].x[0], filled[0].x[1])


def test_a_sample_without_any_modality_is_a_clear_error(av):
    model = make(av, small())
    batch = with_absent(with_absent(av.test.batch(range(3)), "audio", [1]), "image", [1])
    with pytest.raises(ValueError, match=r"samples \[1\] have none of the modalities"):
        model(batch)
    with pytest.raises(ValueError, match="unknown modalities"):
        model(av.test.batch(range(3)), modalities=["video"])


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_non_empty_subset_predicts(av, fusion):
    model = make(av, small(fusion, "token_choice"))
    batch = av.test.batch(range(5))
    with torch.no_grad():
        outs = {s: model(batch, modalities=s).logits for s in (("audio",), ("image",), ("audio", "image"))}
    assert all(torch.isfinite(o).all() for o in outs.values())
    audio, image, both = outs.values()
    assert not torch.allclose(audio, both) and not torch.allclose(image, both)


def test_modality_dropout_keeps_a_modality_and_only_runs_in_training(av):
    present = torch.ones(2000, 3, dtype=torch.bool)
    present[:500, 2] = False
    dropped = modality_dropout(present, 0.5, torch.Generator().manual_seed(0))
    assert dropped.any(1).all() and not (dropped & ~present).any()
    rate = 1 - dropped[500:].float().mean()
    assert 0.3 < rate < 0.5  # 0.5 minus the samples restored because they lost everything
    model = make(av, small("early", missing={"dropout": 0.9}))
    batch = av.test.batch(range(6))
    with torch.no_grad():
        assert torch.equal(model(batch).logits, model(batch).logits)  # eval: no dropout
        model.train()
        assert model(batch).present.sum() < 12


# --- batch independence -------------------------------------------------------------------------


@pytest.mark.parametrize("router", list(PER_TOKEN))
@pytest.mark.parametrize("fusion", ["early", "bottleneck"])
def test_per_token_routing_makes_outputs_independent_of_the_batch(av, router, fusion):
    model = make(av, small(fusion, router))
    batch = av.test.batch(range(10))
    with torch.no_grad():
        full = model(batch).logits
        order = torch.randperm(10, generator=torch.Generator().manual_seed(1))
        shuffled = model(av.test.batch(order)).logits
        assert torch.allclose(shuffled, full[order], atol=1e-5)
        for i in (0, 7):
            alone = model(av.test.batch([i])).logits
            assert torch.allclose(alone[0], full[i], atol=1e-5)


def test_expert_choice_depends_on_the_batch_by_design(av):
    # Expert choice lets experts compete for tokens across the batch (documented in its router).
    model = make(av, small("early", "expert_choice"))
    batch = av.test.batch(range(16))
    with torch.no_grad():
        full = model(batch).logits
        alone = torch.cat([model(av.test.batch([i])).logits for i in range(16)])
    assert not torch.allclose(full, alone, atol=1e-4)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("strategy", ["mask", "bank"])
def test_a_batch_of_mixed_modality_subsets_matches_per_sample_runs(av, fusion, strategy):
    model = make(av, small(fusion, "token_choice", missing={"strategy": strategy}))
    batch = av.test.batch(range(6))
    batch = with_absent(with_absent(batch, "audio", [1, 4]), "image", [2, 5])  # both, no audio, no image
    with torch.no_grad():
        full = model(batch)
        for i in range(6):
            one = model(
                type(batch)(
                    inputs={k: v[i : i + 1] for k, v in batch.inputs.items()},
                    present={k: v[i : i + 1] for k, v in batch.present.items()},
                    target=batch.target[i : i + 1],
                    masks={k: v[i : i + 1] for k, v in batch.masks.items()},
                )
            )
            assert torch.allclose(one.logits[0], full.logits[i], atol=1e-5), i
            assert torch.equal(one.present[0], full.present[i])


# --- cost accounting ------------------------------------------------------------------------------


def test_flops_count_only_the_experts_that_run(av):
    batch = av.test.batch(range(16))
    dense = measure_cost(make(av, small("early")), batch)
    moe_model = make(av, small("early", "token_choice"))
    moe = measure_cost(moe_model, batch)
    # expert_hidden defaults to hidden // k: a token's expert FLOPs equal the dense FFN's.
    assert moe.components["experts"] == pytest.approx(dense.components["ffn"], rel=1e-9)
    with torch.no_grad():
        real_tokens = moe_model(batch).records[0].modality.numel()  # routed = real tokens
    assert dense.components["ffn"] * 16 == 2 * real_tokens * 2 * (2 * 16 * 32)  # 2 blocks, 2 matmuls
    bank = moe_model.fusion.trunk.blocks[0].ffn.experts
    assert moe.components["experts"] * 16 == 2 * real_tokens * 2 * expert_row_flops(bank)  # 2 layers, k=2
    assert moe.params > dense.params
    per_expert = (bank.w_in.numel() + bank.w_out.numel()) / 4
    assert moe.active_params == pytest.approx(moe.params - 2 * (4 - 2) * per_expert)
    assert dense.active_params == dense.params
    assert moe.components["attention"] > 0 and moe.components["encoders"] > 0


@pytest.mark.parametrize(
    ("kind", "outputs", "shape"), [("multilabel", 5, (6, 5)), ("regression", 1, (6,)), ("regression", 3, (6, 3))]
)
def test_multilabel_and_regression_heads(kind, outputs, shape):
    task = load_task("synthetic", num_samples=60, dim=8)
    cfg = get_preset("tiny/token-choice", overrides=[f"model.head.kind={kind}"]).model
    torch.manual_seed(0)
    model = build_model(cfg, task.specs, task_type="regression", outputs=outputs).fit(task.train)
    out = model(task.train.batch(range(6)))
    assert out.logits.shape == shape
    target = torch.rand(shape)
    loss = (
        F.binary_cross_entropy_with_logits(out.logits, target)
        if kind == "multilabel"
        else F.mse_loss(out.logits, target)
    )
    loss.backward()
    assert model.head.linear.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs `outputs`"):
        build_model(cfg.model_copy(update={"head": cfg.head.model_copy(update={"kind": "multilabel"})}), task.specs)
