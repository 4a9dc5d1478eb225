"""Lifelong learning by task: a run grown by a new task (a new head, experts reserved for it)
predicts the earlier task exactly as the run did until training changes the old parts, keeps
what it freezes, evaluates earlier tasks on their own data, resumes; the task mask (tests/test_moe_masks.py);
the CLI's --add-task and its usage errors."""

import json

import pytest
import torch

from conftest import assert_same_checkpoint
from modalmoe.cli import main
from modalmoe.evaluate.runner import evaluate
from modalmoe.lifelong import GrowError, add_task, growth_callbacks
from modalmoe.lifelong.tasks import continue_task, grow_task_config, task_data
from modalmoe.model.presets import get_preset
from modalmoe.train import Trainer, load_checkpoint, load_run_model, read_run_config
from modalmoe.train.trainer import experiment_task

EXPERTS = 2  # tiny presets have 4 experts per MoE layer: grown runs have 6
T2 = {"seed": 2, "mode": "unique", "num_classes": 8}  # another synthetic task on the same modalities


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny token-choice run on the tiny synthetic task (the first task)."""
    out = tmp_path_factory.mktemp("tasks") / "t1"
    Trainer(get_preset("tiny/token-choice", overrides=["train.epochs=3"]), out, progress=False).fit()
    return out


def grown(run, label="t2", epochs=2, **options):
    options = {"experts": EXPERTS, "freeze": "experts", "task_options": T2, **options}
    config = grow_task_config(read_run_config(run), run_dir=run, label=label, previous="t1", **options)
    data = config.model_dump(mode="json")
    data["train"]["epochs"] = epochs
    return type(config).model_validate(data)


def test_a_model_with_an_added_task_predicts_the_earlier_task_as_before(run):
    old = load_run_model(run).eval()
    task = experiment_task(read_run_config(run))
    batch = task.test.batch(range(len(task.test)))
    with torch.no_grad():
        expected = old(batch).logits
        two = add_task(old, "t2", outputs=8, experts=EXPERTS, previous="t1").eval()
        assert two.tasks == ["t1", "t2"] and old.tasks == [] and list(two.task_heads) == ["t1"]
        assert two.config.moe.num_experts == 4 + EXPERTS
        assert torch.allclose(two(batch, task="t1").logits, expected, atol=1e-6, rtol=0)
        assert two(batch).logits.shape == (len(batch), 8)  # the new task's fresh head
        for name, param in two.named_parameters():  # as if t2 had trained: its new router rows start tied
            if name.endswith("router.weight"):
                param[4:] += 0.1 * torch.randn_like(param[4:])
        three = add_task(two, "t3", outputs=3, experts=EXPERTS).eval()  # a third task: t1 and t2 both kept
        assert three.tasks == ["t1", "t2", "t3"] and three.config.moe.num_experts == 4 + 2 * EXPERTS
        assert torch.allclose(three(batch, task="t1").logits, expected, atol=1e-6, rtol=0)
        assert torch.allclose(three(batch, task="t2").logits, two(batch).logits, atol=1e-6, rtol=0)
        # t1's pass never reaches the experts added for t2 and t3.
        routers_before = [dict(vars(m)) for m in three.modules() if hasattr(m, "accepts_mask")]
        picked = torch.cat([r.expert_index.flatten() for r in three(batch, task="t1").records])
        assert int(picked.max()) < 4
        # Which task a pass is for is an input: no router attribute changes during it.
        assert [dict(vars(m)) for m in three.modules() if hasattr(m, "accepts_mask")] == routers_before
    with pytest.raises(ValueError, match="no task 'zz'"):
        three(batch, task="zz")
    with pytest.raises(GrowError, match="already has a task 't2'"):
        add_task(three, "t2", outputs=2)


def _states(run_dir, which="last"):
    return load_checkpoint(run_dir / "checkpoints" / f"{which}.safetensors").model_state()


@pytest.mark.parametrize("freeze", ["experts", "old"])
def test_a_task_grown_run_keeps_what_it_freezes_and_evaluates_the_earlier_task(run, tmp_path, freeze):
    config = grown(run, freeze=freeze)
    assert config.task_options["seed"] == 2 and [t.name for t in config.model.tasks] == ["t1", "t2"]
    assert config.model.moe.reserved.tasks == {"t2": [4, 5]}
    start, _ = Trainer(config, tmp_path / "unused", progress=False, callbacks=growth_callbacks(config)).build()
    start = {k: v.detach().clone() for k, v in start.state_dict().items()}
    Trainer(config, tmp_path / "run", progress=False, callbacks=growth_callbacks(config)).fit()
    old, new = _states(run, "best"), _states(tmp_path / "run")
    bank, router = "fusion.trunk.blocks.0.ffn.experts.w_in", "fusion.trunk.blocks.0.ffn.router.weight"
    for name in (bank, router):
        assert torch.equal(new[name][:4], old[name][:4]), name
        assert not torch.equal(new[name][4:], start[name][4:]), name  # the new task's experts learn
    for key in ("linear.weight", "norm.weight"):  # the run's head is t1's now, and stays as it was
        assert torch.equal(new[f"task_heads.t1.{key}"], old[f"head.{key}"])
    assert new["head.linear.weight"].shape[0] == 8
    whole = "fusion.trunk.blocks.0.qkv.weight"
    assert torch.equal(new[whole], old[whole]) == (freeze == "old")
    # The earlier task on its own data, through the grown run: with everything old frozen, exactly the run.
    grown_model, first = load_run_model(tmp_path / "run"), task_data(read_run_config(tmp_path / "run"), "t1")
    assert len(first.test) == len(experiment_task(read_run_config(run)).test)
    after = evaluate(grown_model, first.test, subsets=False, task="t1").metrics
    before = evaluate(load_run_model(run), first.test, subsets=False).metrics
    if freeze == "old":
        assert after == before


def test_a_task_grown_run_resumes_exactly(run, tmp_path, interrupted_then_resumed):
    config = grown(run, freeze="none", ewc=10.0, epochs=3, fisher_samples=16)
    Trainer(config, tmp_path / "a", progress=False, callbacks=growth_callbacks(config)).fit()
    saved = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.safetensors")
    before, resumed = interrupted_then_resumed(config, tmp_path / "b", fail_at=4)
    assert before.progress["step"] < saved.progress["step"]
    assert_same_checkpoint(saved, resumed)


def test_grow_task_config_refuses_what_it_cannot_grow(run):
    config = read_run_config(run)
    with pytest.raises(GrowError, match="has no modality 'm0'"):
        grow_task_config(config, run_dir=run, label="x", task="mfeat")
    with pytest.raises(GrowError, match="vector \\[8\\] in the run's task but vector \\[16\\]"):
        grow_task_config(config, run_dir=run, label="x", task_options={"dim": 16})
    with pytest.raises(GrowError, match="already has a task 'synthetic'"):
        grow_task_config(config, run_dir=run, label="synthetic")  # the run's own task is labelled by its name
    soft = get_preset("tiny/soft")
    with pytest.raises(GrowError, match="supports token_choice.*experts=0"):
        grow_task_config(soft, run_dir=run, label="x", experts=2)
    assert grow_task_config(soft, run_dir=run, label="x", experts=0).model.moe.num_experts == 4


def test_cli_adds_a_task_evaluates_earlier_tasks_and_refuses_bad_usage(run, tmp_path, capsys):
    out = tmp_path / "grown"
    args = ["--continue-from", str(run), "--add-task", "t2", "--task-option", "seed=2", "--experts", "1"]
    assert main(["train", *args, "--freeze", "old", "--set", "train.epochs=1", "--quiet", "--out", str(out)]) == 0
    config = read_run_config(out)
    assert [t.name for t in config.model.tasks] == ["synthetic", "t2"] and config.task_options["seed"] == 2
    assert config.task_options["num_samples"] == 120  # the run's options, with --task-option over them
    parameters = json.loads((out / "summary.json").read_text())["parameters"]  # freeze old: all the run's are fixed
    assert parameters["trainable"] == parameters["total"] - sum(p.numel() for p in load_run_model(run).parameters())
    assert main(["eval", str(out), "--task", "synthetic", "--subsets", "none"]) == 0
    assert main(["eval", str(run), "--subsets", "none"]) == 0
    first = json.loads((out / "eval-test-synthetic.json").read_text())
    assert first["task"] == "synthetic"
    assert first["metrics"] == json.loads((run / "eval-test.json").read_text())["metrics"]  # freeze old: exact
    capsys.readouterr()
    assert main(["eval", str(out), "--task", "nope"]) == 2
    assert "no task 'nope'" in capsys.readouterr().out
    assert main(["train", "--continue-from", str(run), "--add-task", "t2", "--add-modality", "m1"]) == 2
    assert main(["train", "tiny/token-choice", "--task-option", "seed=1"]) == 2
    assert "--add-task" in capsys.readouterr().err
    assert main(["train", "--continue-from", str(run), "--add-task", "t3", "--task-option", "seed"]) == 2
    assert main(["train", "--continue-from", str(run), "--add-task", "t3", "--task", "mfeat"]) == 2
    with pytest.raises(GrowError, match="already has a task 't2'"):
        continue_task(out, label="t2")


def test_a_grown_model_refuses_expert_pruning_but_merges(run):
    from modalmoe.efficiency.experts import expert_usage, merge_experts, prune_experts

    old = load_run_model(run).eval()
    grown = add_task(old, "t2", outputs=8, experts=EXPERTS, previous="t1")
    data = experiment_task(read_run_config(run)).valid
    usage = expert_usage(grown, data)
    with pytest.raises(ValueError, match="reserves experts.*merge-experts"):
        prune_experts(grown, keep=4, usage=usage)
    merged = merge_experts(grown, into=4, usage=usage, data=data)  # the router and its reservations stay
    batch = data.batch(range(8))
    with torch.no_grad():
        picked = torch.cat([r.expert_index.flatten() for r in merged(batch, task="t1").records])
    assert int(picked.max()) < 4  # t1 still never routes to t2's experts
