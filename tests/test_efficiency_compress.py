"""Post-training compression: int8 quantization, expert pruning and merging, the
``compress`` command and the bench's compress variants. Each method changes what it should
(int8 weights, fewer experts, shared experts) and round-trips through a run directory."""

import json

import pytest
import torch
from torch import nn

from modalmoe.bench.store import ResultsStore
from modalmoe.cli import main
from modalmoe.efficiency.compress import compress_run
from modalmoe.efficiency.experts import expert_usage, merge_experts, moe_layers, prune_experts
from modalmoe.efficiency.flops import measure_cost
from modalmoe.efficiency.quantize import (
    Int8ExpertBank,
    Int8Linear,
    Int8PatchConv,
    int8_matmul,
    quantize_int8,
    quantize_rows,
)
from modalmoe.model.presets import get_preset
from modalmoe.moe.experts import ExpertBank
from modalmoe.train import Trainer, load_run_model
from modalmoe.train.trainer import experiment_task


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tc"
    Trainer(get_preset("tiny/token-choice", overrides=["train.epochs=3"]), out, progress=False).fit()
    return out


@pytest.fixture(scope="module")
def task(run):
    from modalmoe.train.trainer import read_run_config

    return experiment_task(read_run_config(run))


def logits(model, data):
    with torch.no_grad():
        return model(data.batch(range(len(data)))).logits


def test_int8_matmul_is_exact_on_integers_and_close_on_floats():
    q = torch.randint(-127, 128, (33, 24), dtype=torch.int8)
    w = torch.randint(-127, 128, (24, 10), dtype=torch.int8)
    exact = int8_matmul(q, torch.ones(33, 1), w, torch.ones(10))
    assert torch.equal(exact, (q.long() @ w.long()).float())
    x = torch.randn(50, 64)
    linear = nn.Linear(64, 40)
    quantized = Int8Linear.from_float(linear)
    assert quantized.weight.dtype == torch.int8 and quantized.scale.shape == (40,)
    reference = linear(x).detach()
    assert ((quantized(x) - reference).norm() / reference.norm()) < 0.02
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and scale.shape == (50, 1)


@pytest.mark.parametrize(
    "conv, shape", [(nn.Conv2d(3, 8, 4, stride=4), (2, 3, 12, 8)), (nn.Conv1d(5, 6, 3, stride=3), (2, 5, 10))]
)
def test_a_patch_convolution_runs_as_an_int8_linear(conv, shape):
    assert Int8PatchConv.supports(conv) and not Int8PatchConv.supports(nn.Conv2d(3, 8, 3, padding=1))
    x = torch.randn(shape)
    reference = conv(x).detach()
    y = Int8PatchConv.from_float(conv)(x)
    assert y.shape == reference.shape
    assert ((y - reference).norm() / reference.norm()) < 0.03


def test_quantize_int8_converts_linears_and_experts_and_leaves_the_original(run, task):
    model = load_run_model(run)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = quantize_int8(model, min_weight=0)
    banks = [m for m in qmodel.modules() if isinstance(m, Int8ExpertBank)]
    assert banks and not any(isinstance(m, (nn.Linear, ExpertBank)) for m in qmodel.modules())
    bank = banks[0]
    assert bank.w_in.dtype == torch.int8 and bank.scale_in.shape == (bank.num_experts, bank.w_in.shape[-1])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert qmodel.config.quantization.method == "int8"
    reference, quantized = logits(model, task.test), logits(qmodel, task.test)
    assert ((quantized - reference).norm() / reference.norm()) < 0.05
    agree = (quantized.argmax(1) == reference.argmax(1)).float().mean()
    assert agree > 0.9
    # Same FLOPs and weights counted: int8 matmuls count like float ones.
    cost, qcost = measure_cost(model, task.test.batch(range(16))), measure_cost(qmodel, task.test.batch(range(16)))
    assert qcost.params == cost.params and qcost.flops == pytest.approx(cost.flops, rel=0.02)


def test_patch_convolutions_stay_float_unless_asked():
    model = nn.Sequential(nn.Conv2d(16, 64, 7, 7), nn.Flatten(), nn.Linear(256, 64))
    x = torch.randn(2, 16, 14, 14)
    default = quantize_int8(model, min_weight=0)
    assert isinstance(default[0], nn.Conv2d) and isinstance(default[2], Int8Linear)
    patched = quantize_int8(model, min_weight=0, patch_convs=True)
    assert isinstance(patched[0], Int8PatchConv)
    reference = model(x).detach()
    assert ((patched(x) - reference).norm() / reference.norm()) < 0.03


def test_layers_below_min_weight_stay_float(run):
    model = load_run_model(run)
    qmodel = quantize_int8(model, min_weight=10**9)
    assert not any(isinstance(m, (Int8Linear, Int8ExpertBank)) for m in qmodel.modules())


def test_pruning_keeps_the_most_used_experts_and_their_router_rows(run, task):
    model = load_run_model(run)
    layers = moe_layers(model)
    usage = {name: torch.tensor([0.1, 0.4, 0.2, 0.3]) for name in layers}
    pruned = prune_experts(model, keep=2, usage=usage)
    assert pruned.config.moe.num_experts == 2
    for name, layer in moe_layers(pruned).items():
        original = layers[name]
        assert layer.router.num_experts == 2 and layer.experts.num_experts == 2
        assert torch.equal(layer.experts.w_in, original.experts.w_in[[1, 3]])
        assert torch.equal(layer.router.weight, original.router.weight[[1, 3]])
    out = logits(pruned, task.test)
    assert out.shape == logits(model, task.test).shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="keep at least k"):
        prune_experts(model, keep=1, usage=usage)


def test_routers_tied_to_modality_groups_refuse_pruning(task):
    from modalmoe.model.multimodal import build_model

    cfg = get_preset("tiny/modality-experts")
    model = build_model(cfg.model, task.specs, task_type="classification", outputs=2)
    usage = {name: torch.ones(6) / 6 for name in moe_layers(model)}
    with pytest.raises(NotImplementedError, match="does not support dropping experts"):
        prune_experts(model, keep=4, usage=usage)


def test_merging_into_as_many_experts_changes_nothing(run, task):
    model = load_run_model(run)
    usage = expert_usage(model, task.valid)
    assert all(abs(float(u.sum()) - 1) < 1e-6 for u in usage.values())
    merged = merge_experts(model, into=4, usage=usage, by="weights")
    torch.testing.assert_close(logits(merged, task.test), logits(model, task.test), rtol=1e-5, atol=1e-5)


def test_merging_a_permuted_copy_of_an_expert_keeps_the_function(run, task):
    """Expert 1 is expert 0 with its hidden units shuffled: the same function. Merging by
    weights must find them (alignment undoes the shuffle), merge them and change nothing."""
    model = load_run_model(run)
    with torch.no_grad():
        for layer in moe_layers(model).values():
            bank, perm = layer.experts, torch.randperm(layer.experts.hidden)
            bank.w_in[1] = bank.w_in[0][:, perm]
            bank.w_out[1] = bank.w_out[0][perm]
    usage = expert_usage(model, task.valid)
    for by in ("weights", "outputs"):
        merged = merge_experts(model, into=3, usage=usage, by=by, data=task.valid)
        for layer in moe_layers(merged).values():
            assert layer.experts.num_experts == 3 and layer.router.num_experts == 4
            assert int(layer.expert_map[0]) == int(layer.expert_map[1])  # the twins share one expert
        assert merged.config.moe.bank_experts == 3
        torch.testing.assert_close(logits(merged, task.test), logits(model, task.test), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "method, options, check",
    [
        ("int8", {"min_weight": 0}, lambda m: any(isinstance(x, Int8ExpertBank) for x in m.modules())),
        (
            "prune-experts",
            {"experts": 2},
            lambda m: all(lyr.experts.num_experts == 2 for lyr in moe_layers(m).values()),
        ),
        (
            "merge-experts",
            {"experts": 2, "by": "outputs"},
            lambda m: all(lyr.expert_map is not None for lyr in moe_layers(m).values()),
        ),
        (
            "tokens",
            {"reduction": "merge", "keep": 0.5, "layers": (0,)},
            lambda m: m.config.token_reduction.method == "merge",
        ),
    ],
)
def test_a_compressed_run_round_trips_through_its_directory(run, task, tmp_path, method, options, check):
    out = tmp_path / method
    summary = compress_run(run, out, method, **options)
    assert summary["method"] == method and summary["test"]["accuracy"] >= 0
    loaded = load_run_model(out)
    assert check(loaded)
    again = json.loads((out / "summary.json").read_text())
    assert again["test"] == summary["test"]
    # The loaded model predicts what the freshly compressed one did (its summary's accuracy).
    from modalmoe.evaluate.runner import evaluate

    assert evaluate(loaded, task.test).metrics["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    with pytest.raises(Exception, match="already exists"):
        compress_run(run, out, method, **options)


def test_the_compress_command(run, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["compress", str(run), "--method", "int8", "--out", str(out)]) == 0
    assert "compressed run" in capsys.readouterr().out
    assert main(["eval", str(out), "--subsets", "none"]) == 0
    capsys.readouterr()
    assert main(["compress", str(run), "--method", "prune-experts", "--out", str(tmp_path / "p")]) == 2
    captured = capsys.readouterr()
    assert "needs --experts" in captured.out + captured.err
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_the_bench_stores_a_record_per_compression_and_skips_what_does_not_fit(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: eff\ntasks: [tiny]\ndesigns: [dense-early, token-choice]\nseeds: [0]\nmatch: none\n"
        "overrides: [train.epochs=1]\nrobustness: {subsets: false}\n"
        "compress:\n  - {method: int8}\n  - {method: prune-experts, experts: 2}\n"
        "  - {method: distill, student: dense-early, student_overrides: [model.hidden=16]}\n"
    )
    out = tmp_path / "bench"
    assert main(["bench", "--suite", str(suite), "--out", str(out), "--jobs", "1"]) == 0
    records = {r["design"]: r for r in ResultsStore(out).records()}
    assert set(records) == {
        "dense-early",
        "dense-early+int8",
        "token-choice",
        "token-choice+int8",
        "token-choice+prune2",
        "token-choice+distill-dense-early*",
    }
    assert all(r["status"] == "ok" and r["flops"] > 0 for r in records.values())
    assert records["dense-early"]["skipped_variants"] == {
        "prune2": "needs an MoE model",
        "distill-dense-early*": "needs an MoE model",
    }
    assert records["token-choice+prune2"]["config"]["model"]["moe"]["num_experts"] == 2
    student = records["token-choice+distill-dense-early*"]
    assert student["config"]["model"]["hidden"] == 16 and student["flops"] < records["token-choice"]["flops"]
    assert "token-choice+prune2" in (out / "leaderboard.md").read_text()
