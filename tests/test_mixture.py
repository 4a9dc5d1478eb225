"""One model over many tasks (issue 21): the task mixture, one head per task, the training
samplers, task-aware routers, and per-task evaluation with the mean normalised score."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_same_checkpoint
from modalmoe.cli import main
from modalmoe.config import ExperimentConfig
from modalmoe.data.tasks import load_task
from modalmoe.data.tasks.mixture import layout, make_mixture
from modalmoe.encoders.base import Tokens
from modalmoe.evaluate import evaluate
from modalmoe.evaluate.tasks import majority_rates, mean_normalised, normalised, task_scores
from modalmoe.model.blocks import TrunkShape
from modalmoe.model.fusion import fusions
from modalmoe.model.heads import TaskHeads
from modalmoe.model.multimodal import build_model
from modalmoe.moe import build_moe_layer, routers
from modalmoe.run import head_outputs
from modalmoe.train import Trainer, load_checkpoint, load_run_model
from modalmoe.train.samplers import samplers, task_shares

A = {"name": "synthetic", "options": {"num_samples": 200, "num_modalities": 2, "dim": 6, "seed": 1}}
B = {"name": "synthetic", "options": {"num_samples": 100, "num_modalities": 3, "dim": 6, "num_classes": 3, "seed": 2}}


def members():
    return {
        "a": load_task("synthetic", num_samples=200, num_modalities=2, dim=6, seed=1),
        "b": load_task("synthetic", num_samples=100, num_modalities=3, dim=4, num_classes=3, seed=2),
    }


def test_a_mixture_keeps_each_tasks_modalities_classes_and_samples_apart():
    parts = members()
    mix = make_mixture(parts)
    assert list(mix.specs) == ["a/m0", "a/m1", "b/m0", "b/m1", "b/m2"]
    for split in ("train", "valid", "test"):
        data, a, b = mix.splits[split], parts["a"].splits[split], parts["b"].splits[split]
        assert len(data) == len(a) + len(b)
        task = data.extras["task"]
        assert task.tolist() == [0] * len(a) + [1] * len(b)
        # a task's modalities are present only on its own samples, with its own values
        assert not data.present["a/m0"][task == 1].any() and not data.present["b/m2"][task == 0].any()
        torch.testing.assert_close(data.inputs["a/m1"][task == 0], a.inputs["m1"])
        torch.testing.assert_close(data.inputs["b/m2"][task == 1], b.inputs["m2"])
        # labels side by side: b's classes come after a's two
        assert data.target[task == 0].tolist() == a.target.tolist()
        assert (data.target[task == 1] - 2).tolist() == b.target.tolist()
    parts_layout = layout(mix.train)
    assert parts_layout.names == ("a", "b") and parts_layout.starts == (0, 2) and parts_layout.sizes == (2, 3)
    assert list(mix.train.classes[:3]) == ["a/" + c for c in parts["a"].train.classes] + [
        "b/" + parts["b"].train.classes[0]
    ]
    assert layout(parts["a"].train) is None  # a plain task is not a mixture


def test_mixture_options_share_and_limit_and_their_errors():
    with pytest.raises(ValueError, match="two members are labelled 'synthetic'"):
        load_task("mixture", tasks=[A, B])
    mix = load_task("mixture", tasks={"a": A, "b": B}, limit={"a": 30}, share={"x": ["a/m0", "b/m0"]})
    assert len(mix.train) == 30 + len(load_task("synthetic", **B["options"]).train)
    assert "x" in mix.specs and "a/m0" not in mix.specs and "b/m0" not in mix.specs
    assert mix.train.present["x"].all()  # both tasks feed the shared modality
    wide = {**B, "options": {**B["options"], "dim": 5}}
    with pytest.raises(ValueError, match="one kind and shape"):  # widths 6 and 5
        load_task("mixture", tasks={"a": A, "b": wide}, share={"x": ["a/m0", "b/m0"]})
    with pytest.raises(ValueError, match="one kind and shape"):
        make_mixture(members(), share={"x": ["a/m0", "b/m0"]})
    with pytest.raises(ValueError, match="not a member modality"):
        make_mixture(members(), share={"x": ["a/m0", "c/m0"]})
    with pytest.raises(ValueError, match="unknown options"):
        load_task("mixture", tasks={"a": A}, sizes=3)
    with pytest.raises(ValueError, match="limit names"):
        load_task("mixture", tasks={"a": A}, limit={"z": 3})
    with pytest.raises(ValueError, match="name its member tasks"):
        load_task("mixture")


def test_task_heads_score_each_sample_only_within_its_own_task():
    torch.manual_seed(0)
    heads = TaskHeads(dim=8, tasks={"a": 2, "b": 3})
    x, task = torch.randn(6, 8), torch.tensor([0, 1, 0, 1, 1, 0])
    logits = heads(x, task)
    assert logits.shape == (6, 5)
    pred = logits.argmax(-1)
    assert ((pred < 2) == (task == 0)).all()
    torch.testing.assert_close(logits[task == 0, :2], heads.heads[0](x[task == 0]))
    probs = logits.softmax(-1)
    assert (probs[task == 0, 2:] == 0).all() and torch.isfinite(logits.log_softmax(-1)).all()
    with pytest.raises(ValueError, match="task id"):
        heads(x)


def test_samplers_share_each_epoch_among_tasks_and_replay_exactly():
    train = make_mixture(members()).train
    n = len(train)
    prop = samplers.create("proportional", dataset=train, seed=0, epoch=3)
    assert sorted(prop.tolist()) == list(range(n))
    uni = samplers.create("uniform", dataset=train, seed=0, epoch=3)
    assert len(uni) == n and torch.equal(uni, samplers.create("uniform", dataset=train, seed=0, epoch=3))
    assert not torch.equal(uni, samplers.create("uniform", dataset=train, seed=0, epoch=4))
    shares = [task_shares(samplers.create("uniform", dataset=train, seed=0, epoch=e), train)[1] for e in range(20)]
    assert abs(sum(shares) / len(shares) - 0.5) < 0.03
    a_size, b_size = torch.bincount(train.extras["task"]).tolist()
    sizes = torch.tensor([float(a_size), float(b_size)])
    for t in (1.0, 3.0):
        expected = float((sizes ** (1 / t))[1] / (sizes ** (1 / t)).sum())
        got = [
            task_shares(samplers.create("temperature", dataset=train, seed=s, epoch=0, temperature=t), train)[1]
            for s in range(20)
        ]
        assert abs(sum(got) / len(got) - expected) < 0.03
    # a task drawn more often than it has samples cycles through them: counts differ by <= 1
    one = samplers.create("uniform", dataset=train, seed=1, epoch=0)
    b = one[train.extras["task"][one] == 1]
    counts = torch.bincount(b - a_size, minlength=b_size)
    assert len(b) > b_size and counts.min() >= 1 and counts.max() - counts.min() <= 1
    with pytest.raises(ValueError, match="temperature must be > 0"):
        samplers.create("temperature", dataset=train, seed=0, epoch=0, temperature=0)
    with pytest.raises(KeyError, match="Known samplers"):
        samplers.get("balanced")


@pytest.mark.parametrize("name", ["per_task", "task_film"])
def test_task_aware_routers_read_the_task_and_need_it_for_several_tasks(name):
    torch.manual_seed(0)
    layer = build_moe_layer(dim=8, hidden=16, num_experts=4, router=name, k=1, tasks=("a", "b"))
    x = torch.randn(40, 8)
    with pytest.raises(ValueError, match="got no task ids"):
        layer(x)
    with torch.no_grad():  # make the tasks' gates differ
        if name == "per_task":
            layer.router.weight[1].neg_()
        else:
            layer.router.shift[1].fill_(3.0)
    a = layer(x, task=torch.zeros(40, dtype=torch.long)).record
    b = layer(x, task=torch.ones(40, dtype=torch.long)).record
    assert not torch.equal(a.expert_index, b.expert_index)
    assert a.task.tolist() == [0] * 40  # the record keeps each token's task
    with pytest.raises(ValueError, match=r"task ids must be in \[0, 2\)"):
        layer(x, task=torch.full((40,), 2))


def test_task_film_starts_as_token_choice():
    torch.manual_seed(0)
    film = routers.create("task_film", dim=8, num_experts=4, tasks=("a", "b"), k=2)
    plain = routers.create("token_choice", dim=8, num_experts=4, k=2)
    plain.weight.data.copy_(film.weight.data)
    x, zeros = torch.randn(30, 8), torch.zeros(30, dtype=torch.long)
    got, want = film(x, zeros, zeros, task=torch.arange(30) % 2), plain(x, zeros, zeros)
    assert torch.equal(got.expert_index, want.expert_index)
    torch.testing.assert_close(got.weight, want.weight)


def test_task_routers_of_a_one_task_model_route_as_one_gate():
    config = ExperimentConfig.model_validate(
        {"task": "synthetic", "model": {"moe": {"every": 1, "router": "per_task"}}}
    )
    model = build_model(config.model, members()["a"].specs, outputs=2)
    router = model.fusion.trunk.blocks[0].ffn.router
    assert router.tasks == ("task",) and router.weight.shape[0] == 1
    out = model(members()["a"].train.batch(range(8)))  # no task ids: every token is task 0
    assert out.logits.shape == (8, 2) and out.records[0].task is None


def mixture_config(router: str | None, **train) -> ExperimentConfig:
    moe = {} if router is None else {"every": 1, "num_experts": 4, "k": 1, "router": router}
    return ExperimentConfig.model_validate(
        {
            "task": "mixture",
            "task_options": {"tasks": {"a": A, "b": B}},
            "model": {"dim": 16, "depth": 1, "heads": 2, "hidden": 32, "moe": moe or {"every": 0}},
            "train": {"epochs": 2, "batch_size": 32, "lr": 0.01, "early_stopping": None, **train},
        }
    )


@pytest.mark.parametrize(
    ("router", "train"),
    [("per_task", {"sampler": {"name": "temperature", "options": {"temperature": 2.0}}}), (None, {})],
)
def test_a_mixture_trains_and_evaluates_per_task(tmp_path, router, train):
    config = mixture_config(router, **train)
    Trainer(config, tmp_path / "run", progress=False).fit()
    model = load_run_model(tmp_path / "run")
    assert isinstance(model.head, TaskHeads) and model.head.sizes == {"a": 2, "b": 3}
    task = load_task("mixture", **config.task_options)
    report = evaluate(model, task.test, train_scale=task.train, specialists={"a": 0.9})
    assert [t.task for t in report.tasks] == ["a", "b"]
    a, b = report.tasks
    assert a.samples + b.samples == len(task.test) == report.samples
    assert (a.reference_kind, b.reference_kind) == ("specialist", "perfect") and a.reference == 0.9
    assert a.normalised == pytest.approx((a.metrics["accuracy"] - a.majority) / (0.9 - a.majority))
    assert report.mean_normalised == pytest.approx((a.normalised + b.normalised) / 2)
    # the subsets are each task's own: 3 for a (2 modalities), 7 for b (3), plus the full set
    assert len(report.subsets) == 1 + 3 + 7
    payload = report.to_dict()
    assert payload["tasks"][0]["task"] == "a" and payload["mean_normalised"] == report.mean_normalised


def test_per_task_scores_and_the_normalised_scale():
    mix = make_mixture(members())
    parts = layout(mix.test)
    majority = majority_rates(parts, mix.train, mix.test)
    assert set(majority) == {"a", "b"} and all(0 < v <= 1 for v in majority.values())
    # perfect logits: every task at accuracy 1, normalised to 1 against a perfect reference
    logits = torch.nn.functional.one_hot(mix.test.target, parts.num_classes).float() * 10
    scores = task_scores(logits, mix.test.target, mix.test.extras["task"], parts, majority=majority)
    assert all(s.metrics["accuracy"] == 1.0 and s.normalised == pytest.approx(1.0) for s in scores)
    assert mean_normalised(scores) == pytest.approx(1.0)
    assert normalised(0.5, 0.5, 0.9) == 0.0 and normalised(0.7, 0.5, 0.5) is None
    assert normalised(0.7, 0.5, 0.505) is None  # a reference within a point of the majority: no scale
    assert head_outputs(mix.train) == {"a": 2, "b": 3}


@pytest.mark.parametrize("router", [None, "token_choice"])
def test_early_fusion_runs_the_trunk_on_real_tokens_only_with_the_same_outputs(router):
    """A mixture's sample carries few of the modalities: early fusion packs each row's real tokens
    (the trunk never computes on the others' padding) and gives what the full layout gives."""
    torch.manual_seed(0)
    moe = None if router is None else {"num_experts": 4, "router": router, "k": 2}
    shape = TrunkShape(dim=16, depth=2, heads=2, hidden=32, moe_every=1 if router else 0, moe=moe)
    fusion = fusions.create("early", modalities=["a", "b", "c"], shape=shape).eval()
    owner = torch.tensor([0, 1, 2, 0, 1])  # each row carries one modality (a task mixture's rows)
    streams = []
    for i, n in enumerate((3, 5, 2)):
        mask = (owner == i).unsqueeze(1).expand(5, n).clone()
        mask[0, -1] = mask[0, -1] & (i != 0)  # a row with padding inside its own modality too
        streams.append(Tokens(torch.randn(5, n, 16) * mask.unsqueeze(-1), mask))
    packed = fusion(streams)
    x = torch.cat([s.x for s in streams], 1)
    mask = torch.cat([s.mask for s in streams], 1)
    modality = torch.cat([torch.full_like(s.mask, i, dtype=torch.long) for i, s in enumerate(streams)], 1)
    full = fusion.trunk(x, mask, modality)
    torch.testing.assert_close(torch.cat(packed.tokens, 1), full.x, rtol=1e-5, atol=1e-5)
    if router is not None:
        assert torch.equal(packed.records[0].expert_index, full.records[0].expert_index)
        assert torch.equal(packed.records[0].modality, full.records[0].modality)


def test_a_mixture_run_resumes_exactly_and_the_cli_reports_each_task(tmp_path, interrupted_then_resumed, capsys):
    config = mixture_config("task_film", sampler={"name": "uniform"})
    Trainer(config, tmp_path / "a", progress=False).fit()
    uninterrupted = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.safetensors")
    _, resumed = interrupted_then_resumed(config, tmp_path / "b", fail_at=9)  # mid-epoch 2 (7 steps each)
    assert_same_checkpoint(uninterrupted, resumed)
    assert main(["eval", str(tmp_path / "a"), "--subsets", "none"]) == 0
    shown = capsys.readouterr().out
    assert "Tasks of the mixture" in shown and "mean normalised score" in shown
    saved = json.loads((tmp_path / "a" / "eval-test.json").read_text())
    assert [t["task"] for t in saved["tasks"]] == ["a", "b"] and saved["mean_normalised"] is not None
