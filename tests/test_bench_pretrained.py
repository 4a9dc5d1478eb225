"""The pretrained suites (issue 20): every task from scratch and with pretrained encoders, dense
and MoE at equal FLOPs, and the upcycling protocol on the pretrained variant. The default tier
checks the plan and the sample limit of upcycle cells; the slow tier runs pretrained-smoke end
to end on the real easy-vqa files with the pinned EfficientNet-Lite0 weights."""

from __future__ import annotations

import pytest
import torch

from modalmoe.bench.cells import plan_cells
from modalmoe.bench.store import ResultsStore
from modalmoe.bench.suites import SuiteConfig, UpcycleProtocol, load_suite
from modalmoe.cli import main
from modalmoe.data import load_task
from modalmoe.data.splits import limit_task
from modalmoe.model.presets import get_preset


@pytest.mark.parametrize("name", ["pretrained", "pretrained-smoke"])
def test_each_pretrained_task_has_scratch_pretrained_and_upcycled_cells(name):
    suite = load_suite(name)
    cells = plan_cells(suite)
    labels = {(c.key[0], c.key[1]) for c in cells}
    for protocol in suite.upcycle:
        encoders = get_preset(f"{protocol.task}/dense-early").model.encoders
        assert any(e.name in ("image_efficientnet_lite0", "text_minilm") for e in encoders.values())
        scratch = get_preset(f"{protocol.task}/dense-early").task
        # the same data from scratch, dense and MoE, and with pretrained encoders, dense and MoE
        scratch_files = [t for t in suite.tasks if get_preset(f"{t}/dense-early").task == scratch]
        assert len(scratch_files) == 2, scratch_files
        for task in scratch_files:
            assert {(task, "dense-early"), (task, "token-choice")} <= labels
        for arm in ("parent", "continued", "upcycled"):
            assert (protocol.task, protocol.arm_label(arm)) in labels
    assert suite.match == "flops" and len(suite.seeds) >= (3 if name == "pretrained" else 2)


def test_limit_applies_to_upcycle_protocols_and_names_strays():
    suite = SuiteConfig(name="x", limit={"tiny": 50}, upcycle=[UpcycleProtocol(task="tiny")])
    assert suite.limit == {"tiny": 50}
    with pytest.raises(ValueError, match="does not run"):
        SuiteConfig(name="x", limit={"av-digits": 50}, upcycle=[UpcycleProtocol(task="tiny")])
    task = load_task("synthetic", num_samples=120, dim=8)
    small = limit_task(task, 10)
    assert all(len(d) == min(10, len(task.splits[s])) for s, d in small.splits.items())
    picked = small.train.target
    assert torch.equal(picked, limit_task(task, 10).train.target)  # seeded: the same subset every time
    assert limit_task(task, None) is task


@pytest.mark.slow
def test_the_pretrained_smoke_suite_runs_end_to_end(tmp_path):
    suite = load_suite("pretrained-smoke")
    protocol = suite.upcycle[0]
    out = tmp_path / "bench"
    assert main(["bench", "--suite", "pretrained-smoke", "--out", str(out), "--jobs", "1"]) == 0
    records = ResultsStore(out).records()
    assert len(records) == len(plan_cells(suite)) and all(r["status"] == "ok" for r in records)
    by = {(r["task"], r["design"], r["seed"]): r for r in records}
    limit = suite.limit[protocol.task]
    batch = int(next(o for o in suite.overrides if o.startswith("train.batch_size=")).split("=")[1])
    for seed in suite.seeds:
        parent = by[(protocol.task, protocol.arm_label("parent"), seed)]
        up = by[(protocol.task, protocol.arm_label("upcycled"), seed)]
        cont = by[(protocol.task, protocol.arm_label("continued"), seed)]
        assert up["upcycle"]["parent"] == parent["run_dir"] == cont["upcycle"]["parent"]
        # the upcycle cells train on the suite's limited data, as the design cells do
        assert parent["steps"] == -(-limit // batch) * protocol.epochs
        assert abs(up["flops"] - cont["flops"]) / cont["flops"] < 0.03
        pretrained = by[(protocol.task, "dense-early", seed)]
        assert pretrained["config"]["model"]["encoders"]["image"]["name"] == "image_efficientnet_lite0"
        # MoE from scratch matched to dense from scratch (equal forward FLOPs within the tolerance)
        dense, moe = by[("easy-vqa", "dense-early", seed)], by[("easy-vqa", "token-choice", seed)]
        assert abs(moe["flops"] - dense["flops"]) / dense["flops"] <= suite.tolerance + 1e-9
    board = (out / "leaderboard.md").read_text()
    assert "easy-vqa-pretrained" in board and "## Upcycling" in board
