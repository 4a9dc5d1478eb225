"""Token reduction (merge, attention and router pruning): fewer tokens really run, per
modality, never mixing with padding; FLOPs drop; the output keeps its shape and pooling
contract; configs are validated and reproducible."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modalmoe.config import ConfigError, ModelConfig, to_yaml, validate
from modalmoe.data.tasks import load_task
from modalmoe.efficiency import measure_cost
from modalmoe.efficiency.tokens import apply_token_reduction
from modalmoe.model import Block, build_model
from modalmoe.model.fusion import masked_mean
from modalmoe.model.presets import get_preset
from modalmoe.model.reduction import merge, prune, start, target_counts, unmerge

TOKENS = {"m0": 6, "m1": 9, "m2": 4}  # the tiny task's vector encoders, widened to several tokens


@pytest.fixture(scope="module")
def task():
    cfg = get_preset("tiny/token-choice")
    return load_task(cfg.task, **cfg.task_options)


def config(preset: str, reduction: dict | None = None, *extra: str) -> ModelConfig:
    overrides = [f"model.encoders.{m}.options.tokens={n}" for m, n in TOKENS.items()] + list(extra)
    if reduction is not None:
        overrides.append(f"model.token_reduction={json.dumps(reduction)}")
    return get_preset(preset, overrides=overrides).model


def build(task, model_config: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(model_config, task.specs, outputs=task.train.num_classes).fit(task.train).eval()


def with_absent(batch, name, rows):
    present = dict(batch.present)
    flags = present[name].clone()
    flags[rows] = False
    present[name] = flags
    return type(batch)(inputs=dict(batch.inputs), present=present, target=batch.target, masks=dict(batch.masks))


def block_inputs(model):
    """Hooks recording the number of real tokens each block receives, per sample."""
    seen: dict[str, list] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, Block):

            def hook(_module, args, name=name):
                seen.setdefault(name, []).append(args[1].sum(1))

            hooks.append(module.register_forward_pre_hook(hook))
    return seen, hooks


def kept(n: int, keep: float) -> int:
    return max(1, math.ceil(keep * n - 1e-6))


# --- the model: fewer tokens run after the reducing layer ------------------------------------------


@pytest.mark.parametrize(
    ("preset", "method"),
    [
        ("tiny/token-choice", "merge"),
        ("tiny/token-choice", "attention"),
        ("tiny/token-choice", "router"),
        ("tiny/dense-early", "merge"),
        ("tiny/dense-early", "attention"),
        ("tiny/dense-late", "merge"),
        ("tiny/dense-late", "attention"),
    ],
)
def test_later_blocks_run_on_fewer_tokens_and_flops_drop(task, preset, method):
    base = build(task, config(preset))
    model = build(task, config(preset, {"method": method, "keep": 0.5, "layers": [0]}))
    batch = task.test.batch(range(8))
    seen, hooks = block_inputs(model)
    out = model(batch)
    for hook in hooks:
        hook.remove()
    expected = sum(kept(n, 0.5) for n in TOKENS.values())
    if preset == "tiny/dense-late":  # one trunk per modality
        for i, n in enumerate(TOKENS.values()):
            assert (seen[f"fusion.trunks.{i}.blocks.0"][0] == n).all()
            assert (seen[f"fusion.trunks.{i}.blocks.1"][0] == kept(n, 0.5)).all()
    else:
        assert (seen["fusion.trunk.blocks.0"][0] == sum(TOKENS.values())).all()
        assert (seen["fusion.trunk.blocks.1"][0] == expected).all()
    if out.records:  # the MoE layers route only what runs
        assert out.records[0].modality.numel() == 8 * sum(TOKENS.values())
        assert out.records[1].modality.numel() == 8 * expected
        for i, n in enumerate(TOKENS.values()):
            assert int((out.records[1].modality == i).sum()) == 8 * kept(n, 0.5)
    assert out.logits.shape == base(batch).logits.shape and torch.isfinite(out.logits).all()
    # Same weights (same seed), so the only difference in FLOPs is the reduction.
    assert measure_cost(model, batch).flops < 0.85 * measure_cost(base, batch).flops


@pytest.mark.parametrize("method", ["merge", "attention"])
def test_reducing_before_the_ffn_shrinks_that_blocks_ffn_too(task, method):
    """ToMe's placement: block 0's MoE layer already routes the reduced tokens, and block 1
    receives them; keep 1.0 changes nothing."""
    batch = task.test.batch(range(8))
    reduction = {"method": method, "keep": 0.5, "layers": [0], "placement": "before_ffn"}
    model = build(task, config("tiny/token-choice", reduction))
    seen, hooks = block_inputs(model)
    out = model(batch)
    for hook in hooks:
        hook.remove()
    expected = sum(kept(n, 0.5) for n in TOKENS.values())
    assert (seen["fusion.trunk.blocks.0"][0] == sum(TOKENS.values())).all()  # the attention runs on all
    assert out.records[0].modality.numel() == 8 * expected  # ... but the FFN on the reduced tokens
    assert (seen["fusion.trunk.blocks.1"][0] == expected).all()
    after = build(task, config("tiny/token-choice", {**reduction, "placement": "after_block"}))
    assert measure_cost(model, batch).flops < measure_cost(after, batch).flops
    same = build(task, config("tiny/token-choice", {**reduction, "keep": 1.0}))
    assert torch.equal(same(batch).logits, build(task, config("tiny/token-choice"))(batch).logits)
    with pytest.raises(ConfigError, match="no router score yet"):
        config("tiny/token-choice", {**reduction, "method": "router"})


def test_per_modality_keep_and_layer_before_the_first_block(task):
    model = build(task, config("tiny/token-choice", {"method": "merge", "keep": {"m1": 0.25}, "layers": [-1]}))
    out = model(task.test.batch(range(5)))
    for record in out.records:  # both blocks run on the merged tokens; m0 and m2 keep theirs
        counts = [int((record.modality == i).sum()) for i in range(3)]
        assert counts == [5 * TOKENS["m0"], 5 * kept(TOKENS["m1"], 0.25), 5 * TOKENS["m2"]]


def test_keep_one_equals_no_reduction_and_switching_off_restores_the_model(task):
    base = build(task, config("tiny/token-choice"))
    batch = task.test.batch(range(8))
    reference = base(batch)
    for method in ("merge", "attention", "router"):
        same = build(task, config("tiny/token-choice", {"method": method, "keep": 1.0, "layers": [0]}))
        assert torch.equal(same(batch).logits, reference.logits)
    apply_token_reduction(base, method="merge", keep=0.5, layers=[0])
    assert not torch.allclose(base(batch).logits, reference.logits)
    apply_token_reduction(base, method="none")
    assert torch.equal(base(batch).logits, reference.logits)
    assert base.config.model_dump() == config("tiny/token-choice").model_dump()  # the config is as it was


def test_block_statistics_path_matches_the_fused_attention():
    """The path reducing blocks take (explicit softmax, sizes as a float bias) computes the
    same block output; proportional attention with all sizes 1 changes nothing."""
    from modalmoe.moe import FeedForward

    torch.manual_seed(0)

    block = Block(dim=16, heads=2, ffn=FeedForward(dim=16, hidden=32, activation="gelu")).eval()
    x = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    ids = torch.zeros(3, 7, dtype=torch.long)
    plain = block(x, mask, ids, ids).x
    result = block(x, mask, ids, ids, stats=True, scores=True, size=torch.ones(3, 7))
    explicit, stats = result.x, result.stats
    torch.testing.assert_close(explicit, plain)
    assert stats.keys.shape == (3, 7, 8)
    # Each real query's probabilities sum to 1 over real keys, so what is received sums to 1.
    torch.testing.assert_close(stats.received.sum(1), torch.ones(3))
    assert (stats.received[~mask] == 0).all()


def test_absent_modalities_keep_their_rows_apart(task):
    model = build(task, config("tiny/token-choice", {"method": "merge", "keep": 0.5, "layers": [0]}))
    batch = with_absent(with_absent(task.test.batch(range(6)), "m1", [0, 2]), "m0", [3])
    out = model(batch)
    assert torch.isfinite(out.logits).all()
    present = torch.stack([batch.present[m] for m in TOKENS], 1)
    assert torch.equal(out.present, present)
    record = out.records[1]
    for s in range(6):
        for i, n in enumerate(TOKENS.values()):
            count = int(((record.sample == s) & (record.modality == i)).sum())
            assert count == (kept(n, 0.5) if present[s, i] else 0)
    # A sample's prediction does not depend on which other samples lack a modality: merging
    # is per row (the batch only sets the padded width).
    alone = model(with_absent(task.test.batch([0]), "m1", [0]))
    torch.testing.assert_close(alone.logits, out.logits[:1], atol=1e-5, rtol=1e-5)


# --- the pure functions --------------------------------------------------------------------


def adversarial_state(seed: int = 0):
    """Rows with padding and an absent modality, where every token looks most like tokens of
    the *other* modality and like padding, to tempt a wrong merge."""
    g = torch.Generator().manual_seed(seed)
    b, n = 4, 12
    modality = torch.tensor([0] * 5 + [1] * 7).expand(b, n).clone()
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 3:5] = False  # padding inside modality 0
    mask[2, 5:] = False  # modality 1 absent
    mask[3, 10:] = False  # padding at the end
    x = torch.randn(b, n, 6, generator=g) * mask.unsqueeze(-1)
    shared = torch.randn(b, 1, 6, generator=g)
    metric = shared + 0.1 * torch.randn(b, n, 6, generator=g)  # all alike, across modalities
    return start(x, mask, modality, torch.arange(b).unsqueeze(1).expand(b, n)), metric


@pytest.mark.parametrize("keep", [0.75, 0.5, 0.25, 0.01])
def test_merge_stays_within_modality_and_averages_by_size(keep):
    state, metric = adversarial_state()
    fractions = torch.tensor([keep, keep])
    out = merge(state, metric, fractions)
    # Padding positions map to nothing; every real position maps to a token of its own modality.
    assert (out.source[~state.mask] == -1).all() and (out.source[state.mask] >= 0).all()
    assert torch.equal(out.modality.gather(1, out.source.clamp_min(0))[state.mask], state.modality[state.mask])
    # Counts per modality are what keep asks for, and sizes add up to the original counts.
    target = target_counts(state, fractions)
    for i in range(2):
        real = out.mask & (out.modality == i)
        assert torch.equal(real.sum(1), target[:, i])
        assert torch.equal((out.size * real).sum(1), (state.mask & (state.modality == i)).sum(1).float())
    # A merged token is the plain mean of the original tokens it stands for (sizes start at 1).
    for row in range(state.x.shape[0]):
        for t in range(out.x.shape[1]):
            members = state.source[row][out.source[row] == t]
            if out.mask[row, t]:
                assert int(out.size[row, t]) == members.numel()
                torch.testing.assert_close(out.x[row, t], state.x[row, members].mean(0))
            else:
                assert members.numel() == 0 and (out.x[row, t] == 0).all()


def test_unmerged_mean_pooling_is_the_size_weighted_mean():
    state, metric = adversarial_state(seed=3)
    out = merge(state, metric, torch.tensor([0.4, 0.3]))
    x, carried = unmerge(out, out.x)
    assert torch.equal(carried, state.mask) and x.shape == state.x.shape
    for i in range(2):
        original = carried & (state.modality == i)
        weight = out.size * (out.mask & (out.modality == i))
        weighted = (out.x * weight.unsqueeze(-1)).sum(1) / weight.sum(1, keepdim=True).clamp_min(1)
        torch.testing.assert_close(masked_mean(x, original), weighted)


def test_prune_keeps_the_top_scores_per_modality():
    state, _ = adversarial_state()
    score = torch.arange(12.0).expand(4, 12)  # later tokens score higher
    out = prune(state, score, torch.tensor([0.5, 0.5]))
    x, carried = unmerge(out, out.x)
    for row in range(4):
        for i in range(2):
            real = (state.mask[row] & (state.modality[row] == i)).nonzero().squeeze(1)
            expect = real[-kept(real.numel(), 0.5) :] if real.numel() else real
            survivors = (carried[row] & (state.modality[row] == i)).nonzero().squeeze(1)
            assert torch.equal(survivors, expect)
    assert (x[~carried] == 0).all() and torch.equal(x[carried], state.x[carried])


# --- configs ------------------------------------------------------------------------------


def test_invalid_configs_say_what_is_wrong(task):
    with pytest.raises(ConfigError, match="out of range for depth=2"):
        config("tiny/token-choice", {"method": "merge", "layers": [2]})
    with pytest.raises(ConfigError, match="needs MoE blocks"):
        config("tiny/dense-early", {"method": "router"})
    with pytest.raises(ConfigError, match="fusion 'early' or 'late'"):
        config("tiny/dense-bottleneck", {"method": "merge"})
    with pytest.raises(ConfigError, match="only with method 'merge'"):
        config("tiny/token-choice", {"method": "attention", "layers": [-1]})
    with pytest.raises(ConfigError, match=r"in \(0, 1\]"):
        config("tiny/token-choice", {"method": "merge", "keep": 0.0})
    with pytest.raises(ConfigError, match="did you mean keep"):
        config("tiny/token-choice", {"method": "merge", "kep": 0.5})
    with pytest.raises(ValueError, match="unknown modalities.*'image'"):
        build(task, config("tiny/token-choice", {"method": "merge", "keep": {"image": 0.5}}))
    cross = build(task, config("tiny/dense-cross"))
    with pytest.raises(ConfigError, match="fusion 'early' or 'late'"):
        apply_token_reduction(cross, method="merge")
    cross.config = None  # a model built by hand: the fusion itself refuses
    with pytest.raises(ValueError, match=r"fusions \('early', 'late'\)"):
        apply_token_reduction(cross, method="merge")
    with pytest.raises(ConfigError, match="out of range"):
        apply_token_reduction(build(task, config("tiny/dense-late")), method="merge", layers=[5])


def test_apply_updates_the_config_and_the_saved_config_reproduces_it(task):
    model = build(task, config("tiny/token-choice"))
    apply_token_reduction(model, method="attention", keep={"m0": 0.5, "m1": 0.25}, layers=[0])
    assert model.config.token_reduction.method == "attention"
    saved = validate(json.loads(json.dumps(model.config.model_dump(mode="json"))), ModelConfig)
    again = build(task, saved)
    again.load_state_dict(model.state_dict())
    batch = task.test.batch(range(6))
    torch.testing.assert_close(again(batch).logits, model(batch).logits)
    assert "method: attention" in to_yaml(model.config)


def test_a_run_trained_with_reduction_reloads_with_it(tmp_path):
    from modalmoe.train import Trainer, load_run_model

    overrides = [f"model.encoders.{m}.options.tokens={n}" for m, n in TOKENS.items()]
    overrides += ["train.epochs=1", 'model.token_reduction={"method": "merge", "keep": 0.5}']
    Trainer(get_preset("tiny/token-choice", overrides=overrides), tmp_path, progress=False).fit()
    assert "token_reduction" in (tmp_path / "config.yaml").read_text()
    model = load_run_model(tmp_path)  # the checkpoint's config matches the run's
    assert model.fusion.trunk.reduction is not None and model.config.token_reduction.method == "merge"
    apply_token_reduction(model, method="attention", keep=0.25, layers=[1])
    assert model.config.token_reduction.method == "attention" and model.config.token_reduction.layers == [1]
