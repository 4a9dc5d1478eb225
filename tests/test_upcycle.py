"""Sparse upcycling: an MoE model filled with copies of a dense model's FFNs computes, at
step 0, what the dense model computed (outputs and task loss), for every discrete router,
shared experts and fine-grained experts; and the refusals where it cannot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modalmoe.cli import main
from modalmoe.config import UpcycleConfig
from modalmoe.data.tasks import load_task
from modalmoe.model.multimodal import build_model
from modalmoe.model.presets import get_preset
from modalmoe.model.upcycle import UpcycleError, UpcycleWarning, upcycle_transform, upcycled_experiment
from modalmoe.run import RunDir
from modalmoe.train import Trainer
from modalmoe.train.init import load_matching

BASE = ["model.moe.every=1", "model.moe.num_experts=8"]


@pytest.fixture(scope="module")
def task():
    return load_task("synthetic")


def dense_model(task, activation="gelu"):
    torch.manual_seed(0)
    cfg = get_preset("synthetic/dense-early", overrides=[f"model.activation={activation}"])
    return build_model(cfg.model, task.specs, outputs=task.train.num_classes).fit(task.train).eval()


def upcycled(task, dense, overrides, up=None, activation="gelu"):
    cfg = get_preset("synthetic/dense-early", overrides=[*BASE, f"model.activation={activation}", *overrides])
    torch.manual_seed(1)  # a router init of its own, not the dense model's draws
    model = build_model(cfg.model, task.specs, outputs=task.train.num_classes).fit(task.train)
    load_matching(model, dense.state_dict(), Path("<dense>"), transform=upcycle_transform(up or UpcycleConfig()))
    return model.eval()


CASES = {
    "token choice, k=1, coarse": ["model.moe.k=1"],
    "token choice, k=2 (presets: fine-grained, 2 shards)": ["model.moe.k=2"],
    "token choice, k=2, coarse": ["model.moe.k=2", "model.moe.expert_hidden=128"],
    "token choice, 4 shards, k=4": ["model.moe.k=4", "model.moe.expert_hidden=32"],
    "token choice, 2 shards, k=4": ["model.moe.k=4", "model.moe.expert_hidden=64"],
    "sigmoid gating": ["model.moe.k=2", "model.moe.router_options={gating: sigmoid}"],
    "shared expert, k=1 (shared holds a shard)": ["model.moe.k=1", "model.moe.shared_experts=1"],
    "shared experts, k=2": ["model.moe.k=2", "model.moe.shared_experts=2"],
    "shared expert tiled (as wide as the FFN)": [
        "model.moe.k=1",
        "model.moe.shared_experts=1",
        "model.moe.expert_hidden=128",
    ],  # fmt: skip
    "modality experts": ["model.moe.router=modality_experts"],
    "per-modality routers": ["model.moe.router=per_modality"],
    "hierarchical": ["model.moe.router=hierarchical"],
    "expert choice, every expert takes every token": [
        "model.moe.router=expert_choice",
        "model.moe.expert_hidden=128",
        "model.moe.router_options={experts_per_token: 8}",
    ],
}


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("case", list(CASES))
def test_the_upcycled_model_computes_the_dense_model_at_step_0(task, case, activation):
    dense = dense_model(task, activation)
    model = upcycled(task, dense, CASES[case], activation=activation)
    batch = task.test.batch(range(96))
    with torch.no_grad():
        ref, out = dense(batch).logits, model(batch)
    assert out.records, "the upcycled model routes"
    torch.testing.assert_close(out.logits, ref, atol=2e-6, rtol=1e-5)
    loss_dense, loss_moe = F.cross_entropy(ref, batch.target), F.cross_entropy(out.logits, batch.target)
    assert abs(float(loss_moe - loss_dense)) < 1e-6


def test_a_zero_router_keeps_raw_weights_exact_and_noise_gives_up_exactness(task):
    dense = dense_model(task)
    batch = task.test.batch(range(64))
    raw = ["model.moe.k=2", "model.moe.expert_hidden=128", "model.moe.router_options={normalize: false}"]
    model = upcycled(task, dense, raw, UpcycleConfig(router_init="zero"))
    with torch.no_grad():
        torch.testing.assert_close(model(batch).logits, dense(batch).logits, atol=2e-6, rtol=1e-5)
    noisy = upcycled(task, dense, ["model.moe.k=2"], UpcycleConfig(noise=0.05))
    again = upcycled(task, dense, ["model.moe.k=2"], UpcycleConfig(noise=0.05))
    with torch.no_grad():
        assert (noisy(batch).logits - dense(batch).logits).abs().max() > 1e-4
        assert torch.equal(noisy(batch).logits, again(batch).logits)  # seeded


def test_layouts_that_cannot_start_at_the_dense_model_are_refused_or_warned(task):
    dense = dense_model(task)
    with pytest.raises(UpcycleError, match="soft router mixes tokens"):
        upcycled(task, dense, ["model.moe.router=soft"])
    with pytest.raises(UpcycleError, match=r"normalize: false.*router_init: zero"):
        upcycled(task, dense, ["model.moe.k=2", "model.moe.router_options={normalize: false}"])
    with pytest.raises(UpcycleError, match="do not split into experts of 48"):
        upcycled(task, dense, ["model.moe.expert_hidden=48"])
    with pytest.raises(UpcycleError, match="k=1 active experts do not take whole copies of 2 shards"):
        upcycled(task, dense, ["model.moe.k=1", "model.moe.expert_hidden=64"])
    with pytest.warns(UpcycleWarning, match="starts near, not at"):
        upcycled(task, dense, ["model.moe.router=expert_choice"])


def test_upcycle_from_a_dense_run_through_the_cli(tmp_path, capsys):
    dense_run = tmp_path / "dense"
    small = ["--set", "train.epochs=1", "--set", "task_options.num_samples=600"]
    assert main(["train", "synthetic/dense-early", "--out", str(dense_run), "--quiet", *small]) == 0
    assert main(["train", "--upcycle-from", str(dense_run), "--quiet", "--set", "train.epochs=1"]) == 0
    out = Path(f"{dense_run}+upcycled")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["init_from"]["loaded"] > 0 and not summary["init_from"]["unused"]
    config = (out / "config.yaml").read_text()
    assert "upcycle:" in config and str(dense_run.resolve()) in config
    # Step 0 of that run: the trainer's built model is the dense run's model.
    experiment = upcycled_experiment(dense_run)
    model, _ = Trainer(experiment, tmp_path / "step0", progress=False).build()
    dense, data = RunDir(dense_run).load_model(), RunDir(dense_run).task()
    batch = data.test.batch(range(64))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(batch).logits, dense(batch).logits, atol=2e-6, rtol=1e-5)
    capsys.readouterr()
    assert main(["train", "--upcycle-from", str(out)]) == 2
    assert "already an MoE run" in capsys.readouterr().out
