"""`modalmoe bench` with upcycling protocols: the upcycle-smoke suite end to end (the parent
once per seed, both arms after it, starting from it), the Upcycling table's paired difference,
and the planning and checks of the protocol."""

from __future__ import annotations

import pytest
import torch

from modalmoe.bench.stats import summarize
from modalmoe.bench.store import ResultsStore
from modalmoe.bench.suites import SuiteConfig, UpcycleProtocol, load_suite
from modalmoe.bench.upcycling import plan_upcycle, upcycle_tables
from modalmoe.cli import main
from modalmoe.run import RunDir

SUITE = load_suite("upcycle-smoke")
PROTOCOL = SUITE.upcycle[0]


def test_each_seed_plans_a_parent_and_two_arms_that_need_it():
    cells = plan_upcycle(SUITE)
    assert len(cells) == 3 * len(SUITE.seeds)
    parents = {c.key for c in cells if c.arm == "parent"}
    for cell in cells:
        if cell.arm == "parent":
            assert cell.needs is None
        else:
            assert cell.needs in parents and cell.needs[2] == cell.seed
    assert {c.label for c in cells} == {"dense-early:2ep", "dense-early:2ep>continued+2", "dense-early:2ep>upcycled+2"}


def test_the_protocol_is_checked():
    with pytest.raises(ValueError, match="unknown dense designs"):
        SuiteConfig(name="x", upcycle=[UpcycleProtocol(task="tiny", dense="nope")])
    with pytest.raises(ValueError, match="listed twice"):
        SuiteConfig(name="x", upcycle=[UpcycleProtocol(task="tiny"), UpcycleProtocol(task="tiny")])


def test_the_table_pairs_the_arms_seed_by_seed():
    def record(arm, seed, value):
        block = {"protocol": "dense-early:10ep", "arm": arm, "metric": "accuracy"}
        return {"status": "ok", "task": "t", "seed": seed, "metrics": {"accuracy": value}, "upcycle": block}

    records = [record("continued", s, 0.80 + 0.01 * s) for s in range(3)]
    records += [record("upcycled", s, 0.82 + 0.01 * s + 0.002 * (s == 1)) for s in range(3)]
    rows = upcycle_tables(records)[("t", "dense-early:10ep")]
    diff = rows[-1]
    assert diff["arm"] == "upcycled − continued" and diff["difference"].n == 3
    expected = summarize([2.0, 2.2, 2.0])
    assert diff["difference"].mean == pytest.approx(expected.mean) and diff["p_holm"] == diff["p"]


@pytest.mark.slow
def test_the_upcycle_smoke_suite_runs_end_to_end(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--suite", "upcycle-smoke", "--out", str(out), "--jobs", "1"]) == 0
    records = {(r["design"], r["seed"]): r for r in ResultsStore(out).records()}
    assert len(records) == 3 * len(SUITE.seeds) and all(r["status"] == "ok" for r in records.values())
    for seed in SUITE.seeds:
        up = records[(PROTOCOL.arm_label("upcycled"), seed)]
        parent = records[(PROTOCOL.arm_label("parent"), seed)]
        assert up["upcycle"]["parent"] == parent["run_dir"]
        assert up["config"]["train"]["upcycle"] is not None and up["config"]["model"]["moe"]["every"] == 1
        assert up["config"]["train"]["init_from"] == str((out / parent["run_dir"]).resolve())
        # Equal active FLOPs up to the router: the upcycled arm costs what the dense arm costs, within 3%.
        cont = records[(PROTOCOL.arm_label("continued"), seed)]
        assert abs(up["flops"] - cont["flops"]) / cont["flops"] < 0.03
    board = (out / "leaderboard.md").read_text()
    assert "## Upcycling" in board and "upcycled − continued" in board
    # The upcycled run's model loads on its own, an ordinary run.
    run = RunDir(out / records[(PROTOCOL.arm_label("upcycled"), 0)]["run_dir"])
    batch = run.task().test.batch(range(8))
    with torch.no_grad():
        assert run.load_model()(batch).logits.shape[0] == 8
