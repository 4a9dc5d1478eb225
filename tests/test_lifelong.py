"""Lifelong learning: a run grown by a modality and reserved experts predicts as before on the
old modalities, keeps what it freezes while it trains, reloads and resumes exactly; EWC and the
reserved experts (their masks: tests/test_moe_masks.py); the CLI's growth options and its usage errors."""

import json

import pytest
import torch

from conftest import assert_same_checkpoint
from modalmoe.cli import main
from modalmoe.config import ConfigError
from modalmoe.lifelong import EWCPenalty, GrowError, add_modality, grow_config, growth_callbacks
from modalmoe.lifelong.grow import continue_run
from modalmoe.model.presets import get_preset
from modalmoe.train import Trainer, load_checkpoint, load_run_model, read_run_config
from modalmoe.train.trainer import experiment_task

OLD, NEW = "m0", "m1"
EXPERTS = 2  # tiny presets have 4 experts per MoE layer: grown runs have 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny token-choice run on m0 only (stage 1)."""
    out = tmp_path_factory.mktemp("lifelong") / "m0"
    cfg = get_preset("tiny/token-choice", overrides=["train.epochs=3", f'modalities=["{OLD}"]'])
    Trainer(cfg, out, progress=False).fit()
    return out


def grown(run, **options):
    options = {"experts": EXPERTS, "freeze": "experts", "ewc": 0.0, "fisher_samples": 16, **options}
    epochs = options.pop("epochs", 2)
    config = grow_config(read_run_config(run), run_dir=run, add_modalities=[NEW], **options)
    data = config.model_dump(mode="json")
    data["train"]["epochs"] = epochs
    return type(config).model_validate(data)


def test_a_grown_model_predicts_as_the_run_on_the_old_modalities(run):
    old = load_run_model(run)
    config = grown(run)
    assert config.modalities == [OLD, NEW] and config.model.moe.num_experts == 4 + EXPERTS
    assert config.model.moe.reserved.modalities == {NEW: [4, 5]}
    model, _ = Trainer(config, run.parent / "unused", progress=False, callbacks=growth_callbacks(config)).build()
    task = experiment_task(config)
    batch = task.test.batch(range(len(task.test)))
    model.eval()
    with torch.no_grad():
        expected = old(batch).logits
        assert torch.allclose(model(batch, modalities=[OLD]).logits, expected, atol=1e-6, rtol=0)
        assert not torch.allclose(model(batch).logits, expected, atol=1e-3)  # the new modality is read
    # The in-memory API does the same from the model alone.
    added = add_modality(old, NEW, task.specs[NEW], experts=EXPERTS, data=task.train).eval()
    assert added.modalities == [OLD, NEW] and old.modalities == [OLD]
    with torch.no_grad():
        assert torch.allclose(added(batch, modalities=[OLD]).logits, expected, atol=1e-6, rtol=0)
    router = added.fusion.trunk.blocks[0].ffn.router
    assert torch.allclose(router.weight[4:], old.fusion.trunk.blocks[0].ffn.router.weight.mean(0).expand(2, -1))


def _states(run_dir, which="last"):
    return load_checkpoint(run_dir / "checkpoints" / f"{which}.safetensors").model_state()


@pytest.mark.parametrize("freeze", ["experts", "old", "none"])
def test_frozen_parts_do_not_change_while_new_experts_train(run, tmp_path, freeze):
    config = grown(run, freeze=freeze)
    start, _ = Trainer(config, tmp_path / "unused", progress=False, callbacks=growth_callbacks(config)).build()
    start = {k: v.detach().clone() for k, v in start.state_dict().items()}
    Trainer(config, tmp_path / "run", progress=False, callbacks=growth_callbacks(config)).fit()
    old, new = _states(run, "best"), _states(tmp_path / "run")  # grown runs start from the best checkpoint
    bank, router = "fusion.trunk.blocks.0.ffn.experts.w_in", "fusion.trunk.blocks.0.ffn.router.weight"
    for name in (bank, router):
        assert torch.equal(new[name][:4], old[name][:4]) == (freeze != "none"), name
        assert not torch.equal(new[name][4:], start[name][4:]), name  # the new experts and rows learn
    whole = "fusion.trunk.blocks.0.qkv.weight"
    assert torch.equal(new[whole], old[whole]) == (freeze == "old")
    assert not torch.equal(new[f"encoders.{NEW}.proj.weight"], start[f"encoders.{NEW}.proj.weight"])


def test_a_grown_run_with_ewc_reloads_and_resumes_exactly(run, tmp_path, interrupted_then_resumed):
    config = grown(run, ewc=10.0, epochs=3, dropout=0.5)
    Trainer(config, tmp_path / "a", progress=False, callbacks=growth_callbacks(config)).fit()
    model = load_run_model(tmp_path / "a")
    assert model.modalities == [OLD, NEW]
    saved = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.safetensors")
    assert any(k.startswith("objectives.objectives.ewc.fisher.") for k in saved.module_state())
    before, resumed = interrupted_then_resumed(config, tmp_path / "b", fail_at=5)
    assert before.progress["step"] < saved.progress["step"]
    assert_same_checkpoint(saved, resumed)


@torch.no_grad()
def test_ewc_penalty_is_zero_at_the_runs_weights_and_grows_with_distance(run):
    old = load_run_model(run)
    names = [n for n, _ in old.named_parameters()]
    penalty = EWCPenalty.from_run(run, names=names, strength=2.0, samples=32)
    assert float(penalty.penalty(old)) == 0.0
    fisher = {n: penalty.fisher.get(n) for n in names}
    assert all((f >= 0).all() for f in fisher.values()) and sum(float(f.sum()) for f in fisher.values()) > 0
    old.head.linear.weight.add_(0.1)
    assert float(penalty.penalty(old)) > 0
    # In a grown model, only the run's slice of a grown tensor counts.
    config = grown(run, ewc=1.0)
    model, objectives = Trainer(
        config, run.parent / "unused", progress=False, callbacks=growth_callbacks(config)
    ).build()
    ewc = objectives.objectives["ewc"]
    assert float(ewc.penalty(model)) == 0.0
    weight = model.fusion.trunk.blocks[0].ffn.router.weight
    weight[4:] += 1.0
    assert float(ewc.penalty(model)) == 0.0
    weight[0] += 1.0
    assert float(ewc.penalty(model)) > 0


def test_grow_config_takes_the_presets_encoder_and_refuses_what_it_cannot_grow(tmp_path):
    audio = get_preset("av-digits/token-choice", overrides=['modalities=["audio"]'])
    assert "image" not in audio.model.encoders
    config = grow_config(audio, run_dir="runs/audio", add_modalities=["image"], experts=4)
    assert config.model.encoders["image"].options == {"patch": 7}  # from configs/tasks/av-digits.yaml
    assert config.model.moe.reserved.modalities == {"image": [8, 9, 10, 11]}
    assert config.train.init_from == "runs/audio" and config.train.grow.freeze == "experts"
    with pytest.raises(GrowError, match="supports token_choice"):
        grow_config(
            get_preset("av-digits/modality-experts", overrides=['modalities=["audio"]']),
            run_dir="x",
            add_modalities=["image"],
        )
    with pytest.raises(GrowError, match="has no modality 'video'"):
        grow_config(audio, run_dir="x", add_modalities=["video"])
    with pytest.raises(GrowError, match="already has 'audio'"):
        grow_config(audio, run_dir="x", add_modalities=["audio"])
    with pytest.raises(ConfigError, match="train.init_from"):
        get_preset("tiny/token-choice", overrides=["train.grow.modalities=[m1]"])


def test_cli_grows_a_run_and_refuses_bad_usage(run, tmp_path, capsys):
    out = tmp_path / "grown"
    args = ["--continue-from", str(run), "--add-modality", NEW, "--experts", "1", "--freeze", "old"]
    assert main(["train", *args, "--set", "train.epochs=1", "--quiet", "--out", str(out)]) == 0
    config = read_run_config(out)
    assert config.train.grow.freeze == "old" and config.model.moe.num_experts == 5
    assert load_run_model(out).modalities == [OLD, NEW]
    parameters = json.loads((out / "summary.json").read_text())["parameters"]  # freeze old: all the run's are fixed
    assert parameters["trainable"] == parameters["total"] - sum(p.numel() for p in load_run_model(run).parameters())
    capsys.readouterr()
    assert main(["train", "--add-modality", NEW]) == 2
    assert "--continue-from" in capsys.readouterr().err
    assert main(["train", "--continue-from", str(run), "--add-modality", OLD, "--out", str(tmp_path / "x")]) == 2
    assert "already has 'm0'" in capsys.readouterr().out
    assert main(["train", "--continue-from", str(run), "--add-modality", "m9", "--out", str(tmp_path / "y")]) == 2
    assert main(["train", "--continue-from", str(run)]) == 2
    assert main(["train", "tiny/token-choice", "--experts", "2"]) == 2
    assert main(["train", "--continue-from", str(tmp_path / "nope"), "--add-modality", NEW]) == 2
    with pytest.raises(ConfigError, match="unknown key"):
        continue_run(run, add_modalities=[NEW], overrides=["train.grow.frezze=old"])
