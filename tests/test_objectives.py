"""Objectives and the model's token-level outputs: every objective gives finite scalars that
train the model and its own parameters; token masking hides only what it says; OGM-GE
scales the dominant modality's encoder gradient."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modalmoe.config import ModelConfig, ObjectiveConfig
from modalmoe.data.tasks import load_task
from modalmoe.encoders import Tokens
from modalmoe.model import ModelOutput, build_model, fusions
from modalmoe.model.presets import get_preset
from modalmoe.objectives import build_objectives, objectives, ogm_ge
from modalmoe.objectives.masked import draw_token_mask
from modalmoe.objectives.matching import derangement
from modalmoe.objectives.ogm import coefficients, modality_scores

DIM = 16


@pytest.fixture(scope="module")
def av():
    return load_task("av-digits")


def make(av, fusion="early", seed=0, **extra):
    cfg = ModelConfig(
        dim=DIM,
        depth=1,
        heads=2,
        hidden=32,
        fusion={"name": fusion},
        encoders={"image": {"options": {"patch": 7, "stem_channels": 4}}, "audio": {"options": {"patch": 2}}},
        **extra,
    )
    torch.manual_seed(seed)
    return build_model(cfg, av.specs, outputs=10).fit(av.train)


def with_absent(batch, name, rows):
    present = dict(batch.present)
    flags = present[name].clone()
    flags[rows] = False
    present[name] = flags
    return type(batch)(inputs=dict(batch.inputs), present=present, target=batch.target, masks=dict(batch.masks))


class Spy(nn.Module):
    """Wraps a model like DDP does (``.module``) and records every call's batch and output."""

    def __init__(self, model):
        super().__init__()
        self.module, self.calls = model, []

    def forward(self, batch, **kwargs):
        out = self.module(batch, **kwargs)
        self.calls.append((batch, kwargs, out))
        return out


def encoder_grad(model) -> float:
    return sum(float(p.grad.abs().sum()) for p in model.encoders.parameters() if p.grad is not None)


# --- token-level outputs and token masks --------------------------------------------------------


@pytest.mark.parametrize("fusion", fusions.names())
def test_tokens_are_the_final_states_and_inputs_the_encoder_outputs(av, fusion):
    model = make(av, fusion).eval()
    batch = with_absent(av.test.batch(range(5)), "image", [1, 3])
    with torch.no_grad():
        out = model(batch)
        encoded = model.tokens(batch, model.presence(batch))
    assert out.hidden is None and len(out.tokens) == len(out.inputs) == 2
    for i, (tokens, inputs, ref) in enumerate(zip(out.tokens, out.inputs, encoded, strict=True)):
        assert torch.equal(inputs.x, ref.x) and torch.equal(inputs.mask, ref.mask)
        assert tokens.x.shape == (5, ref.mask.shape[1], DIM) and torch.equal(tokens.mask, ref.mask)
        assert not tokens.x[~tokens.mask].any()  # zero where the mask is False (padding, absent)
        pooled = (tokens.x * tokens.mask.unsqueeze(-1)).sum(1) / tokens.mask.sum(1, keepdim=True).clamp_min(1)
        assert torch.allclose(pooled, out.pooled[:, i], atol=1e-6)
    assert not out.tokens[1].mask[[1, 3]].any()


def test_token_masks_change_only_what_depends_on_them(av):
    batch = av.test.batch(range(4))
    late = make(av, "late").eval()
    hide = torch.zeros(4, 16, dtype=torch.bool)
    hide[0, :5] = True
    with torch.no_grad():
        a, b = late(batch), late(batch, token_masks={"image": hide})
    assert torch.equal(b.hidden["image"], hide)
    assert torch.equal(a.inputs[1].x, b.inputs[1].x)  # the targets are the unmasked encoder outputs
    assert torch.equal(a.tokens[0].x, b.tokens[0].x)  # late fusion: audio never sees the image
    assert not torch.allclose(a.tokens[1].x[0], b.tokens[1].x[0])
    assert torch.equal(a.tokens[1].x[1:], b.tokens[1].x[1:])  # other samples untouched
    early = make(av, "early").eval()
    with torch.no_grad():
        a, b = early(batch), early(batch, token_masks={"image": hide})
    assert not torch.allclose(a.tokens[0].x[0], b.tokens[0].x[0])  # early fusion: audio attends to it
    assert torch.allclose(a.logits[1:], b.logits[1:], atol=1e-6) and not torch.allclose(a.logits[0], b.logits[0])
    # Hidden tokens carry their position: two hidden tokens of one sample get different states.
    assert not torch.allclose(b.tokens[1].x[0, 0], b.tokens[1].x[0, 1])
    early.train()
    assert early.mask_token.grad is None
    early(batch).logits.sum().backward()
    assert early.mask_token.grad is None  # unused without token masks
    early(batch, token_masks={"image": hide}).logits.sum().backward()
    assert early.mask_token.grad is not None and early.mask_token.grad.abs().sum() > 0


def test_token_masks_never_hide_padding_and_bad_shapes_are_clear_errors(av):
    model = make(av).eval()
    batch = with_absent(av.test.batch(range(4)), "audio", [2])
    with torch.no_grad():
        width = model(batch).inputs[0].mask.shape[1]
        out = model(batch, token_masks={"audio": torch.ones(4, width, dtype=torch.bool)})
    assert torch.equal(out.hidden["audio"], out.inputs[0].mask)  # padding and absent sample 2: not hidden
    with pytest.raises(ValueError, match=r"token_masks\['image'\] has shape \[4, 3\] but modality 'image'.*\[4, 16\]"):
        model(batch, token_masks={"image": torch.zeros(4, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="unknown modalities"):
        model(batch, token_masks={"video": torch.zeros(4, 3, dtype=torch.bool)})


def test_drawn_token_masks_hide_some_real_tokens_of_every_present_sample():
    mask = torch.zeros(6, 10, dtype=torch.bool)
    for row, n in enumerate([10, 7, 2, 1, 0, 4]):
        mask[row, :n] = True
    torch.manual_seed(0)
    hide = draw_token_mask(Tokens(torch.zeros(6, 10, 4), mask), 0.3)
    assert not (hide & ~mask).any()
    assert hide.sum(1).tolist() == [3, 2, 1, 0, 0, 1]  # at least one, never all; one token: none
    torch.manual_seed(0)
    assert torch.equal(draw_token_mask(Tokens(torch.zeros(6, 10, 4), mask), 0.3), hide)  # seeded


# --- supervised ------------------------------------------------------------------------------------


def test_cross_entropy_trains_the_model_and_label_smoothing_changes_it(av):
    model = make(av).train()
    batch = av.train.batch(range(8))
    out = model(batch)
    plain = objectives.create("cross_entropy")(out, batch, model)["loss"]
    smooth = objectives.create("cross_entropy", label_smoothing=0.2)(out, batch, model)["loss"]
    assert plain.dim() == 0 and torch.isfinite(plain) and not torch.isclose(plain, smooth)
    assert torch.isclose(plain, F.cross_entropy(out.logits, batch.target))
    plain.backward()
    assert encoder_grad(model) > 0


@pytest.mark.parametrize(("kind", "outputs", "name"), [("multilabel", 5, "bce"), ("regression", 3, "mse")])
def test_empty_objectives_pick_the_heads_supervised_loss(kind, outputs, name):
    task = load_task("synthetic", num_samples=60, dim=8)
    cfg = get_preset("tiny/token-choice", overrides=[f"model.head.kind={kind}"]).model
    torch.manual_seed(0)
    model = build_model(cfg, task.specs, task_type="regression", outputs=outputs).fit(task.train)
    batch = task.train.batch(range(6))
    batch.target = torch.rand(6, outputs).round() if kind == "multilabel" else torch.randn(6, outputs)
    losses = build_objectives([], head_kind=model.head.kind)
    assert list(losses.objectives) == [name]
    out = model(batch)
    total, terms = losses(out, batch, model)
    assert set(terms) == {name} and torch.isfinite(total)
    reference = F.binary_cross_entropy_with_logits if kind == "multilabel" else F.mse_loss
    assert torch.isclose(total, reference(out.logits, batch.target))
    total.backward()
    assert encoder_grad(model) > 0
    assert list(build_objectives([], head_kind="classification").objectives) == ["cross_entropy"]
    batch.target = torch.randn(6)
    with pytest.raises(ValueError, match=r"head outputs \[6, \d\] but the target is \[6\]"):
        losses(model(batch), batch, model)


def test_build_objectives_weights_terms_and_rejects_unknown_names_and_options(av):
    with pytest.raises(KeyError, match="unknown objective 'infonse'.*Did you mean 'infonce'"):
        build_objectives([ObjectiveConfig(name="infonse")], head_kind="classification")
    with pytest.raises(ValueError, match=r"no options \['temp'\]"):
        build_objectives([{"name": "infonce", "options": {"temp": 1}}], head_kind="classification")
    with pytest.raises(ValueError, match="pass dim=model.fusion.dim"):
        build_objectives([{"name": "masked"}], head_kind="classification")
    with pytest.raises(ValueError, match="no supervised loss"):
        build_objectives([], head_kind=None)
    model = make(av, head={"embed_dim": 8}).train()
    losses = build_objectives(
        [{"name": "cross_entropy", "weight": 0.5}, {"name": "infonce", "weight": 2.0, "options": {"unimodal": False}}],
        head_kind="classification",
    )
    batch = av.train.batch(range(6))
    total, terms = losses(model(batch), batch, model)
    assert set(terms) == {"cross_entropy", "infonce/audio-image"}
    assert torch.isclose(total, 0.5 * terms["cross_entropy"] + 2.0 * terms["infonce/audio-image"])


# --- contrastive -----------------------------------------------------------------------------------


@pytest.mark.parametrize("unimodal", [True, False])
def test_infonce_trains_the_model_and_its_temperature(av, unimodal):
    model = make(av, head={"embed_dim": 8}).train()
    spy = Spy(model)
    objective = objectives.create("infonce", unimodal=unimodal)
    assert math.isclose(objective.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-5)
    batch = with_absent(av.train.batch(range(8)), "audio", [0])
    terms = objective(model(batch), batch, spy)
    assert set(terms) == {"audio-image"} and torch.isfinite(terms["audio-image"])
    # Unimodal: one pass per modality, each seeing only that modality, on the 7 paired samples.
    calls = [(len(b), kw) for b, kw, _ in spy.calls]
    assert calls == ([(7, {"modalities": ["audio"]}), (7, {"modalities": ["image"]})] if unimodal else [])
    terms["audio-image"].backward()
    assert objective.logit_scale.grad is not None and objective.logit_scale.grad != 0
    assert encoder_grad(model) > 0 and model.embedding_head.proj["audio"].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="embed_dim"):
        objective(make(av)(batch), batch, make(av))


def fake_output(embeddings: dict, present: torch.Tensor) -> ModelOutput:
    b = present.shape[0]
    return ModelOutput(
        logits=None, fused=torch.zeros(b, DIM), pooled=torch.zeros(b, 2, DIM), present=present, embeddings=embeddings
    )


def test_infonce_is_lower_for_aligned_embeddings_and_zero_without_two_pairs(av):
    model = make(av, head={"embed_dim": 8})
    objective = objectives.create("infonce", unimodal=False)
    torch.manual_seed(0)
    z = F.normalize(torch.randn(16, 8), dim=-1)
    present = torch.ones(16, 2, dtype=torch.bool)
    aligned = objective(fake_output({"audio": z, "image": z}, present), None, model)["audio-image"]
    shuffled = {"audio": z, "image": F.normalize(torch.randn(16, 8), dim=-1)}
    random = objective(fake_output(shuffled, present), None, model)["audio-image"]
    assert aligned < 0.1 < math.log(16) / 2 < random
    # One sample with both modalities: nothing to contrast, 0 without NaN, through the real model.
    batch = with_absent(av.train.batch(range(5)), "image", [1, 2, 3, 4])
    for unimodal in (True, False):
        objective = objectives.create("infonce", unimodal=unimodal)
        loss = objective(model(batch), batch, model)["audio-image"]
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(objective.logit_scale.grad)


# --- matching --------------------------------------------------------------------------------------


def test_derangements_move_every_sample_and_follow_the_seed():
    for n in (2, 3, 10):
        torch.manual_seed(n)
        d = derangement(n)
        assert sorted(d.tolist()) == list(range(n)) and not (d == torch.arange(n)).any()
        torch.manual_seed(n)
        assert torch.equal(derangement(n), d)


def test_matching_swaps_only_one_modality_and_trains_its_head(av):
    model = make(av, "late").train()
    spy = Spy(model)
    objective = build_objectives([{"name": "matching", "options": {"modality": "image"}}], head_kind=None, dim=DIM)
    batch = with_absent(av.train.batch(range(8)), "image", [2])
    batch = with_absent(batch, "audio", [5])  # 2 lacks the swapped modality, 5 has nothing else
    torch.manual_seed(0)
    total, terms = objective(model(batch), batch, spy)
    assert set(terms) == {"matching"} and torch.isfinite(total)
    ((negative, _, _),) = spy.calls
    rows = [0, 1, 3, 4, 6, 7]
    assert negative.target.tolist() == batch.target[rows].tolist()
    assert torch.equal(negative.inputs["audio"], batch.inputs["audio"][rows])  # not swapped
    assert torch.equal(negative.masks["audio"], batch.masks["audio"][rows])
    source = [next(j for j in rows if torch.equal(batch.inputs["image"][j], img)) for img in negative.inputs["image"]]
    assert sorted(source) == rows and all(s != r for s, r in zip(source, rows, strict=True))
    total.backward()
    head = objective.objectives["matching"].head[1]
    assert head.weight.grad.abs().sum() > 0 and encoder_grad(model) > 0


# --- masked modelling ------------------------------------------------------------------------------


def test_masked_modelling_hides_real_tokens_and_trains_model_mask_token_and_head(av):
    model = make(av).train()
    spy = Spy(model)
    losses = build_objectives([{"name": "masked", "options": {"ratio": 0.3}}], head_kind=None, dim=DIM)
    batch = with_absent(av.train.batch(range(8)), "audio", [3])
    total, terms = losses(model(batch), batch, spy)
    assert set(terms) == {"masked"} and torch.isfinite(total) and total > 0
    ((_, kwargs, out),) = spy.calls
    assert set(kwargs["token_masks"]) == {"audio"}  # the first modality by default
    hide, real = out.hidden["audio"], out.inputs[0].mask
    assert not (hide & ~real).any() and not hide[3].any()  # never padding, never an absent sample
    counts, lengths = hide.sum(1), real.sum(1)
    assert ((counts >= 1) & (counts < lengths))[lengths >= 2].all()
    total.backward()
    assert model.mask_token.grad.abs().sum() > 0 and encoder_grad(model) > 0
    assert losses.objectives["masked"].head.weight.grad.abs().sum() > 0


# --- OGM-GE ------------------------------------------------------------------------------------------


def test_ogm_ge_slows_the_dominant_modalitys_encoder():
    # m0 carries a strong signal, m1 a weak one: after a few steps m0 dominates.
    task = load_task("synthetic", num_samples=400, num_modalities=2, dim=8, num_classes=4, signal=(3.0, 0.3))
    torch.manual_seed(0)
    model = build_model(get_preset("tiny/dense-late").model, task.specs, outputs=4).fit(task.train).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(0))
    for step in range(10):
        train = task.train.batch(order[28 * step : 28 * step + 28])
        optimizer.zero_grad()
        F.cross_entropy(model(train).logits, train.target).backward()
        optimizer.step()
    optimizer.zero_grad()
    batch = task.train.batch(range(64))
    out = model(batch)
    F.cross_entropy(out.logits, batch.target).backward()
    before = {n: [p.grad.clone() for p in model.encoders[n].parameters()] for n in model.modalities}
    sums, counts = modality_scores(model, out, batch)
    strong, weak = (sums / counts).tolist()
    assert strong > 1.5 * weak
    ks = ogm_ge(model, out, batch, alpha=0.5, noise=False)
    assert ks["m0"] == pytest.approx(1 - math.tanh(0.5 * (strong / weak - 1))) and ks["m0"] < 0.9
    assert ks["m1"] == 1.0
    for name, grads in before.items():
        for p, g in zip(model.encoders[name].parameters(), grads, strict=True):
            assert torch.allclose(p.grad, ks[name] * g)
    assert coefficients(torch.tensor([0.9, 0.3]), torch.tensor([4.0, 0.0]), 1.0) == [1.0, 1.0]  # no comparison
    ogm_ge(model, out, batch, alpha=0.5, noise=True, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(p.grad).all() for p in model.encoders.parameters())
    regression = get_preset("tiny/dense-late", overrides=["model.head.kind=regression"]).model
    reg = build_model(regression, task.specs, task_type="regression").fit(task.train)
    small = task.train.batch(range(4))
    with pytest.raises(ValueError, match="classification head"):
        ogm_ge(reg, reg(small), small, alpha=0.5)
