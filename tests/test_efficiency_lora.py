"""Starting from a run and LoRA: init_from loads what matches and skips a changed head; LoRA
starts equal to the base, trains only adapters and heads (base weights, stacked experts
included, bit-identical), merges into a plain model with the same outputs, resumes exactly,
and load_run_model rebuilds it."""

import io
import json

import pytest
import torch
from rich.console import Console

from modalmoe.config import LoRAConfig
from modalmoe.data.tasks import load_task
from modalmoe.model.lora import apply_lora, count_parameters, has_lora, merge_lora
from modalmoe.model.multimodal import build_model
from modalmoe.model.presets import get_preset
from modalmoe.train import CheckpointError, Trainer, load_checkpoint, load_run_model
from modalmoe.train.init import init_from_run

BASE = ["task_options.num_samples=300", "task_options.signal=2.0", "train.epochs=3", "train.lr=0.003"]
NEW_TASK = ["task_options.num_classes=4", "train.epochs=2"]  # same inputs' shapes, another head


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "base"
    Trainer(get_preset("tiny/token-choice", overrides=BASE), out, progress=False).fit()
    return out


def _model(overrides=()):
    cfg = get_preset("tiny/token-choice", overrides=[*BASE, *overrides])
    task = load_task(cfg.task, **cfg.task_options)
    torch.manual_seed(1)
    model = build_model(cfg.model, task.specs, outputs=task.train.num_classes).fit(task.train)
    return model, task


def _base_name(name: str) -> str:
    """The name a LoRA model's base tensor has in a plain model."""
    return name.replace(".base_layer.", ".").replace("parametrizations.", "").replace(".original", "")


def test_init_from_loads_matching_tensors_and_skips_a_changed_head(base_run, tmp_path):
    saved = load_checkpoint(base_run / "checkpoints" / "best.safetensors").model_state()
    model, _ = _model(NEW_TASK)
    fresh_head = model.head.linear.weight.detach().clone()
    report = init_from_run(model, base_run)
    assert sorted(s.split(":")[0] for s in report.skipped) == ["head.linear.bias", "head.linear.weight"]
    assert "shape (2, 16) in the checkpoint, (4, 16) here" in " ".join(report.skipped)
    own = model.state_dict()
    assert set(report.loaded) == set(own) - {"head.linear.bias", "head.linear.weight"}
    for name in report.loaded:
        assert torch.equal(own[name], saved[name]), name
    assert torch.equal(model.head.linear.weight, fresh_head)
    # the run's fitted input statistics win over those fitted on the new task's data
    refit, _ = _model(NEW_TASK)
    assert not torch.equal(refit.encoders["m0"].standardize.mean, own["encoders.m0.standardize.mean"])
    with pytest.raises(CheckpointError, match="not a run directory"):
        init_from_run(model, tmp_path)
    other, _ = _model(["model.dim=8", "model.hidden=8", "task_options.num_classes=3"])
    with pytest.raises(CheckpointError, match="no parameter .* matches this model"):
        init_from_run(other, base_run)


def test_lora_starts_equal_to_the_base_and_merges_into_a_plain_model(base_run):
    base = load_run_model(base_run)
    _, task = _model()
    batch = task.test.batch(range(32))
    with torch.no_grad():
        expected = base(batch).logits
        report = apply_lora(base, LoRAConfig(rank=2))
        assert report.experts == ["fusion.trunk.blocks.0.ffn.experts", "fusion.trunk.blocks.1.ffn.experts"]
        assert "fusion.trunk.blocks.0.qkv" in report.modules and 0 < report.fraction < 1
        assert torch.equal(base(batch).logits, expected)  # B = 0: the adapted model is the base
        for name, param in base.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
        adapted = base(batch).logits
        assert (adapted - expected).abs().max() > 1e-3
        plain = merge_lora(base)
        assert not has_lora(plain) and count_parameters(plain)[0] == count_parameters(plain)[1]
        fresh, _ = _model()
        assert list(plain.state_dict()) == list(fresh.state_dict())
        torch.testing.assert_close(plain(batch).logits, adapted, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="match no module"):
        apply_lora(_model()[0], LoRAConfig(rank=2, targets=["nothing"], experts=False))


def test_a_lora_run_trains_only_adapters_and_the_new_head(base_run, tmp_path):
    cfg = get_preset(
        "tiny/token-choice", overrides=[*BASE, *NEW_TASK, f"train.init_from={base_run}", "train.lora.rank=2"]
    )
    text = io.StringIO()
    trainer = Trainer(cfg, tmp_path / "lora", progress=False, console=Console(file=text, width=200))
    start, _ = trainer.build()  # the model at step 0 (same seed as fit)
    initial = {k: v.clone() for k, v in start.state_dict().items()}
    result = trainer.fit()
    assert "trainable parameters" in text.getvalue() and "2 kept their fresh values" in text.getvalue()
    summary = json.loads((tmp_path / "lora" / "summary.json").read_text())
    trainable, total = count_parameters(start)
    assert summary["parameters"] == {"trainable": trainable, "total": total, "trainable_fraction": trainable / total}
    assert 0 < summary["parameters"]["trainable_fraction"] < 0.5
    assert summary["init_from"]["loaded"] == len(initial) - 2 - sum("lora_" in k for k in initial)
    final = load_checkpoint(tmp_path / "lora" / "checkpoints" / "last.safetensors").model_state()
    base = load_checkpoint(base_run / "checkpoints" / "best.safetensors").model_state()
    changed = {k for k in initial if not torch.equal(initial[k], final[k])}
    assert changed, "nothing trained"
    for name in initial:
        if "lora_" in name or name.startswith("head."):
            continue
        assert name not in changed, name  # frozen: bit-identical, stacked expert weights included
        assert torch.equal(final[name], base[_base_name(name)]), name
    assert any("experts.parametrizations.w_in.0.lora_B" in k for k in changed)
    assert any("qkv.lora_B" in k for k in changed) and "head.linear.weight" in changed
    # load_run_model rebuilds the adapters from the run's config
    model = load_run_model(tmp_path / "lora")
    assert has_lora(model)
    batch = load_task(cfg.task, **cfg.task_options).test.batch(range(16))
    assert result.test["accuracy"] > 0
    with torch.no_grad():
        adapted = model(batch).logits
        torch.testing.assert_close(merge_lora(model)(batch).logits, adapted, atol=1e-5, rtol=0)


class _Killed(RuntimeError):
    pass


def test_a_lora_run_resumes_exactly(base_run, tmp_path):
    overrides = [*BASE, f"train.init_from={base_run}", "train.lora.rank=2", "train.checkpoint_every=1"]
    cfg = get_preset("tiny/token-choice", overrides=overrides)
    Trainer(cfg, tmp_path / "a", progress=False).fit()

    from modalmoe.train.callbacks import Callback

    class Kill(Callback):
        calls = 0

        def before_update(self, model, batch):  # called once per optimiser step, before it
            Kill.calls += 1
            if Kill.calls == 6:
                raise _Killed
            return {}

    with pytest.raises(_Killed):
        Trainer(cfg, tmp_path / "b", progress=False, callbacks=[Kill()]).fit()
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.safetensors").progress["step"] == 5
    Trainer(cfg, tmp_path / "b", progress=False, console=Console(file=io.StringIO())).fit(resume=True)
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.safetensors")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.safetensors")
    assert a.progress == b.progress
    assert a.tensors.keys() == b.tensors.keys()
    for key, value in a.tensors.items():
        assert torch.equal(value, b.tensors[key]), key
