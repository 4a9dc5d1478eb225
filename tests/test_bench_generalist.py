"""The generalist suites (issue 21): one model over a task mixture against one model per member
(specialists), the parameter-matched dense control, and the leaderboard's Generalist section.
The smoke suite runs end to end in the default tier (a few seconds on 2 cores)."""

from __future__ import annotations

import statistics
from math import ceil

import pytest
import torch

from modalmoe.analysis.report import build_report
from modalmoe.bench.capacity import capacity_tables
from modalmoe.bench.cells import plan_cells
from modalmoe.bench.routing_index import run_statistics, write_bench_index
from modalmoe.bench.specialists import SpecialistCell, generalist_tables
from modalmoe.bench.store import ResultsStore
from modalmoe.bench.suites import SuiteConfig, load_suite
from modalmoe.cli import main
from modalmoe.run import RunDir, read_run_config


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "generalist-smoke"
    assert main(["bench", "--suite", "generalist-smoke", "--out", str(out), "--jobs", "1"]) == 0
    return out


def test_the_generalist_smoke_suite_runs_end_to_end(smoke):
    suite = load_suite("generalist-smoke")
    records = ResultsStore(smoke).records()
    assert len(records) == len(plan_cells(suite)) == len(suite.seeds) * (len(suite.designs) + 2)
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    by = {(r["design"], r["seed"]): r for r in records}
    for r in records:  # every cell is scored on each member in its own classes
        tasks = r["evaluation"]["tasks"]
        assert [t["task"] for t in tasks] == ["redundant", "unique"]
        assert all(0.0 <= t["metrics"]["accuracy"] <= 1.0 and 0.0 < t["majority"] < 1.0 for t in tasks)
    # specialists: one model per member, their parameters together, each member's own samples
    special = by[("specialists/dense-early", 0)]
    generalist = by[("dense-early", 0)]
    assert special["params"] > generalist["params"]
    assert [t["samples"] for t in special["evaluation"]["tasks"]] == [
        t["samples"] for t in generalist["evaluation"]["tasks"]
    ]
    # a specialist given the generalist's optimiser steps trains more epochs over its fewer samples
    steps = by[("specialists/dense-early@steps", 0)]
    assert steps["config"]["train"]["epochs"] == special["config"]["train"]["epochs"] == suite_epochs(suite)
    runs = sorted((smoke / steps["run_dir"]).iterdir())
    assert [read_run_config(r).train.epochs for r in runs] == [
        max(1, round(suite_epochs(suite) * ceil(len_train(smoke, generalist) / 32) / ceil(n / 32)))
        for n in member_sizes(smoke, generalist)
    ]
    # the parameter-matched control has token choice's parameters and spends more FLOPs
    wide, moe = by[("dense-wide", 0)], by[("token-choice", 0)]
    # the routing statistics route the first samples of every member alike
    assert {n.split("/")[0] for n in moe["routing"]["experts_per_token_by_modality"]} == {"redundant", "unique"}
    assert wide["matched"]["mode"] == "params" and wide["matched"]["like"] == "token-choice"
    assert abs(wide["params"] - moe["params"]) / moe["params"] < suite.tolerance
    assert wide["flops"] > 1.1 * generalist["flops"]
    assert abs(moe["flops"] - generalist["flops"]) / generalist["flops"] < suite.tolerance
    board = (smoke / "leaderboard.md").read_text()
    assert "## Generalist" in board and "| design | redundant (%) | unique (%) | mean normalised" in board


def suite_epochs(suite) -> int:
    return int(next(o for o in suite.overrides if o.startswith("train.epochs=")).split("=")[1])


def len_train(out, record) -> int:
    return sum(member_sizes(out, record))


def member_sizes(out, record) -> list[int]:
    task = RunDir(out / record["run_dir"]).task()
    return [int(n) for n in torch.bincount(task.train.extras["task"]).tolist()]


def test_the_generalist_table_normalises_to_the_best_specialist(smoke):
    records = ResultsStore(smoke).records()
    table = generalist_tables(records)["generalist-smoke"]
    assert table["members"] == ["redundant", "unique"]
    rows = {row["design"]: row for row in table["rows"]}
    # the reference of each member is the better specialist's mean accuracy over seeds
    special = [rows["specialists/dense-early"], rows["specialists/dense-early@steps"]]
    for m in table["members"]:
        assert table["reference"][m] == pytest.approx(max(statistics.mean(r["accuracy"][m]) for r in special))
    # the best dense generalist at equal FLOPs is the baseline; the parameter-matched one is not
    assert rows["dense-early"].get("best_dense") and not rows["dense-wide"]["dense"]
    assert all(row.get("p") is not None for name, row in rows.items() if name != "dense-early")


def test_specialists_are_planned_only_for_mixtures_and_match_rules_are_checked():
    suite = SuiteConfig(
        name="x", tasks=["generalist-smoke", "tiny"], designs=["dense-early"], specialists=["dense-early"]
    )
    special = [c for c in plan_cells(suite) if isinstance(c, SpecialistCell)]
    assert {c.task for c in special} == {"generalist-smoke"} and len(special) == len(suite.seeds)
    with pytest.raises(ValueError, match="not one of the suite's designs"):
        SuiteConfig(
            name="x", tasks=["tiny"], designs=["dense-early"], match_designs={"dense-wide": {"match": "params"}}
        )
    with pytest.raises(ValueError, match="must name another trained design"):
        SuiteConfig(
            name="x",
            tasks=["tiny"],
            designs=["dense-early", "dense-wide"],
            match_designs={"dense-wide": {"match": "params", "like": "soft"}},
        )
    with pytest.raises(ValueError, match="unknown specialist designs"):
        SuiteConfig(name="x", tasks=["tiny"], designs=["dense-early"], specialists=["dense-earli"])


def test_the_routing_report_and_index_measure_routing_by_task(smoke):
    records = {(r["design"], r["seed"]): r for r in ResultsStore(smoke).records()}
    html = build_report(smoke / records[("per-task", 0)]["run_dir"])
    assert "MI(expert; task)" in html and 'alt="expert x task, layer 0"' in html
    assert "a task mixture: redundant, unique" in html
    index = write_bench_index(smoke).read_text()
    assert "NMI(expert; task)" in index
    stats = run_statistics(smoke / records[("token-choice", 0)]["run_dir"])
    assert all(0.0 <= layer["nmi_task"] <= 1.0 and 0.0 <= layer["nmi_modality"] <= 1.0 for layer in stats)


def test_the_capacity_smoke_suite_draws_its_curve(tmp_path):
    """Experts grow at fixed FLOPs; each dense reference has its point's parameters."""
    out = tmp_path / "capacity"
    assert main(["bench", "--suite", "capacity-smoke", "--out", str(out), "--jobs", "1"]) == 0
    suite = load_suite("capacity-smoke")
    records = ResultsStore(out).records()
    assert len(records) == len(plan_cells(suite)) == 2 * 3 * len(suite.seeds)
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    by = {(r["design"], r["seed"]): r for r in records}
    budget = by[("token-choice[E=1]", 0)]["flops"]
    for e in (1, 2, 4):
        moe, dense = by[(f"token-choice[E={e}]", 0)], by[(f"dense-early[params@E={e}]", 0)]
        assert moe["config"]["model"]["moe"]["num_experts"] == e and moe["config"]["model"]["moe"]["k"] == 1
        assert abs(moe["flops"] - budget) / budget < suite.tolerance  # active FLOPs stay fixed
        assert abs(dense["params"] - moe["params"]) / moe["params"] < suite.tolerance
    assert by[("token-choice[E=4]", 0)]["params"] > 1.5 * by[("token-choice[E=1]", 0)]["params"]
    assert by[("dense-early[params@E=4]", 0)]["flops"] > 1.5 * budget  # the dense reference's FLOPs grow
    table = capacity_tables(records, suite)[("generalist-smoke", 0)]
    assert [row["value"] for row in table["rows"] if not row["dense"]] == [1, 2, 4]
    assert table["slope"]["points"] == 3 * len(suite.seeds) and table["slope"]["low"] <= table["slope"]["slope"]
    board = (out / "leaderboard.md").read_text()
    assert "## Capacity" in board and "Slope of the MoE points against log2(E)" in board
    png = out / "capacity-generalist-smoke-0.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
