"""Compute matching lands every design on the budget; FLOPs agree with a hand count; seed
statistics agree with scipy and a textbook Holm example; the profilers measure what they say."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats as sps

from modalmoe.bench.compute import (
    BudgetError,
    match_compute,
    match_width,
    measure,
    reference_budget,
    width_field,
    with_width,
)
from modalmoe.bench.stats import holm, paired_test, significance, summarize
from modalmoe.config import ModelConfig
from modalmoe.data import ModalitySpec
from modalmoe.data.batch import MultimodalBatch
from modalmoe.data.tasks import load_task
from modalmoe.efficiency import measure_cost
from modalmoe.efficiency.profile import LiveBytes, inference_memory, latency, peak_memory, training_memory
from modalmoe.model import build_model
from modalmoe.model.presets import get_preset, preset_names
from modalmoe.moe import routers

TINY = [n for n in preset_names() if n.startswith("tiny/")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models are all per-op overhead; a second intra-op thread only adds contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """The tiny task, a fixed measuring batch, build arguments, and dense-early's FLOPs."""
    ref = get_preset("tiny/dense-early")
    task = load_task(ref.task, **ref.task_options)
    batch = task.valid.batch(range(12))
    kw = dict(task_type="classification", outputs=task.train.num_classes)
    return task, batch, kw, reference_budget(ref, task.specs, batch, **kw)


# --- compute matching ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_every_tiny_design_matches_the_flop_budget_or_says_why_not(tiny, name):
    task, batch, kw, reference = tiny
    budget = 1.3 * reference
    cfg = get_preset(name)
    if cfg.model.moe.every and routers.get(cfg.model.moe.router).adaptive:
        # Its FLOPs follow its routing (an untrained router's guess here): suites match it by
        # parameters, which the width reaches as for any design.
        params = reference_budget(get_preset("tiny/token-choice"), task.specs, batch, mode="params", **kw)
        matched = match_compute(cfg, task.specs, batch, budget=params, mode="params", **kw)
        assert abs(matched.relative_error) <= 0.05 and matched.achieved == matched.cost.params
        return
    floor = measure(with_width(cfg, width_field(cfg), 1), task.specs, batch, **kw).flops
    if floor > 1.05 * budget:
        # Per-stream attention (bottleneck, cross) can cost more than the budget at any FFN
        # width: the FFN width alone fails, and matching shrinks the model width instead.
        assert cfg.model.moe.every == 0 and cfg.model.fusion.name in {"bottleneck", "cross"}
        with pytest.raises(BudgetError, match=name):
            match_width(cfg, task.specs, batch, budget=budget, **kw)
        matched = match_compute(cfg, task.specs, batch, budget=budget, **kw)
        assert abs(matched.relative_error) <= 0.05
        assert matched.width_field.startswith("model.dim=") and matched.config.model.dim < cfg.model.dim
        assert measure(matched.config, task.specs, batch, **kw).flops == matched.achieved
        return
    matched = match_compute(cfg, task.specs, batch, budget=budget, **kw)
    assert abs(matched.relative_error) <= 0.05
    assert matched.width_field == ("model.hidden" if cfg.model.moe.every == 0 else "model.moe.expert_hidden")
    # The returned config really is the measured design, and nothing else changed.
    assert measure(matched.config, task.specs, batch, **kw).flops == matched.achieved == matched.cost.flops
    field = matched.width_field.split(".")[-1]
    section = matched.config.model if field == "hidden" else matched.config.model.moe
    assert getattr(section, field) == matched.width
    assert matched.config.model.dim == cfg.model.dim and matched.config.model.depth == cfg.model.depth
    if cfg.model.moe.every:
        assert matched.config.model.hidden == cfg.model.hidden  # dense blocks keep their width


def test_params_mode_and_the_callers_rng_is_untouched(tiny):
    task, batch, kw, _ = tiny
    budget = 3.0 * reference_budget(get_preset("tiny/dense-early"), task.specs, batch, mode="params", **kw)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    matched = match_compute(get_preset("tiny/token-choice"), task.specs, batch, budget=budget, mode="params", **kw)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert abs(matched.relative_error) <= 0.05 and matched.achieved == matched.cost.params
    torch.manual_seed(0)
    built = build_model(matched.config.model, task.specs, **kw)
    assert sum(p.numel() for p in built.parameters()) == matched.achieved


def test_an_unreachable_budget_names_the_design_and_its_range(tiny):
    task, batch, kw, reference = tiny
    cfg = get_preset("tiny/soft")
    with pytest.raises(BudgetError, match=r"tiny/soft .*budget.*model\.moe\.expert_hidden=1 costs .* smallest") as low:
        match_width(cfg, task.specs, batch, budget=0.1 * reference, **kw)
    with pytest.raises(BudgetError, match=r"tiny/soft .*smallest"):
        match_compute(cfg, task.specs, batch, budget=1.0, **kw)  # no model width can be that cheap
    assert isinstance(low.value, ValueError)
    with pytest.raises(BudgetError, match=r"tiny/soft .*expert_hidden=64 costs .* largest"):
        match_compute(cfg, task.specs, batch, budget=50 * reference, max_width=64, **kw)
    with pytest.raises(BudgetError, match=r"tiny/soft .*no integer model\.moe\.expert_hidden is within 0%"):
        match_compute(cfg, task.specs, batch, budget=reference + 1, tolerance=0.0, **kw)
    with pytest.raises(ValueError, match="mode"):
        match_compute(cfg, task.specs, batch, budget=reference, mode="latency", **kw)


def test_measure_cost_equals_a_hand_count_for_a_one_block_dense_model():
    # One vector modality -> N tokens of width D, one pre-norm block (H heads, GELU FFN of
    # width Fh), a linear head with C classes. torch.utils.flop_counter convention: 2 FLOPs
    # per multiply-add, matmuls and attention only (biases, norms, GELU are not counted).
    b, f_in, n, d, h, fh, c = 5, 6, 3, 8, 2, 12, 4
    spec = {"v": ModalitySpec("v", "vector", (f_in,))}
    cfg = ModelConfig(dim=d, depth=1, heads=h, hidden=fh, encoders={"v": {"options": {"tokens": n}}})
    torch.manual_seed(0)
    model = build_model(cfg, spec, outputs=c)
    batch = MultimodalBatch(
        inputs={"v": torch.randn(b, f_in)}, present={"v": torch.ones(b, dtype=torch.bool)}, target=torch.zeros(b)
    )
    encoder = 2 * f_in * (n * d)
    qkv, out = 2 * n * d * (3 * d), 2 * n * d * d
    scores = 2 * h * n * n * (d // h) + 2 * h * n * n * (d // h)  # q @ k^T, then weights @ v
    ffn = 2 * n * d * fh + 2 * n * fh * d
    head = 2 * d * c
    cost = measure_cost(model, batch)
    assert cost.flops == encoder + qkv + out + scores + ffn + head == 3328
    assert cost.components["attention"] == qkv + out + scores and cost.components["ffn"] == ffn
    assert cost.components["encoders"] == encoder and cost.components["heads"] == head


# --- statistics over seeds -----------------------------------------------------------------------


def test_summarize_matches_scipys_t_interval():
    values = [0.81, 0.84, 0.79, 0.86, 0.83]
    s = summarize(values)
    low, high = sps.t.interval(0.95, 4, loc=np.mean(values), scale=sps.sem(values))
    assert s.n == 5 and s.mean == pytest.approx(0.826) and s.std == pytest.approx(np.std(values, ddof=1))
    assert (s.ci_low, s.ci_high) == (pytest.approx(low), pytest.approx(high))
    assert s.ci_low < s.mean < s.ci_high
    one = summarize([0.7])
    assert (one.mean, one.std, one.ci_low, one.ci_high, one.n) == (0.7, 0.0, 0.7, 0.7, 1)
    same = summarize([0.5, 0.5, 0.5])
    assert (same.ci_low, same.ci_high) == (0.5, 0.5)
    with pytest.raises(ValueError):
        summarize([])


def test_paired_test_matches_scipy_and_pairs_by_seed():
    a, b = [0.91, 0.93, 0.92, 0.95], [0.89, 0.90, 0.92, 0.91]
    assert paired_test(a, b) == pytest.approx(sps.ttest_rel(a, b).pvalue)
    # Mappings pair on the seeds both have, whatever their order.
    by_seed_a = {3: 0.95, 0: 0.91, 1: 0.93, 2: 0.92, 7: 0.5}
    by_seed_b = {0: 0.89, 1: 0.90, 2: 0.92, 3: 0.91}
    assert paired_test(by_seed_a, by_seed_b) == pytest.approx(sps.ttest_rel(a, b).pvalue)
    assert paired_test([0.9], [0.8]) is None
    assert paired_test([0.9, 0.8], [0.9, 0.8]) == 1.0
    with pytest.raises(ValueError):
        paired_test([0.9, 0.8], [0.9])


def test_holm_on_a_textbook_example_and_significance():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert list(adjusted) == ["a", "b", "c"]
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert holm({"a": 0.5, "b": 0.6, "skip": None}) == {"a": 1.0, "b": 1.0, "skip": None}
    assert holm({}) == {}
    assert significance(adjusted["a"]) and not significance(adjusted["b"]) and not significance(None)
    assert significance(0.05) and not significance(0.02, alpha=0.01)


# --- profiling ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny):
    task, batch, kw, _ = tiny
    torch.manual_seed(0)
    return build_model(get_preset("tiny/token-choice").model, task.specs, **kw).fit(task.train), batch


def test_latency_percentiles(tiny_model):
    model, batch = tiny_model
    model.train()
    out = latency(model, batch, repeats=5, warmup=1)
    assert set(out) == {"p50_ms", "p95_ms"} and 0 < out["p50_ms"] <= out["p95_ms"]
    assert model.training  # the mode is restored


def test_peak_memory_counts_a_step_and_sees_it_released():
    tracker = LiveBytes()
    with tracker:
        x = torch.ones(2**18)  # 1 MiB of float32
        assert tracker.live == 2**20
        del x
    assert tracker.live == 0 and tracker.peak() == 2**20

    def step():
        y = torch.ones(2**18)
        z = y * 2  # both alive: 2 MiB
        return z.sum()

    assert peak_memory(step) == pytest.approx(2.0, abs=1e-3)
    existing = torch.ones(2**18)
    assert peak_memory(lambda: existing.mul_(2)) == 0.0  # in-place: nothing new


def test_inference_and_training_memory(tiny_model):
    model, batch = tiny_model
    infer = inference_memory(model, batch)
    model.zero_grad(set_to_none=True)
    train = training_memory(model, batch, lambda out, b: F.cross_entropy(out.logits, b.target))
    assert 0 < infer < train
    assert all(p.grad is None for p in model.parameters())  # gradients set aside and restored
