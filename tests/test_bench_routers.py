"""The routers suites (issue 22): every new router and balancing method trains in the bench,
its record says what its routing did, and the leaderboard's Routing section shows it."""

from __future__ import annotations

import pytest

from modalmoe.bench.cells import plan_cells
from modalmoe.bench.routing_table import routing_tables
from modalmoe.bench.store import ResultsStore
from modalmoe.bench.suites import load_suite
from modalmoe.cli import main


@pytest.mark.slow
def test_the_routers_smoke_suite_reports_each_routers_load_drops_and_spent_experts(tmp_path):
    out = tmp_path / "routers-smoke"
    assert main(["bench", "--suite", "routers-smoke", "--out", str(out), "--jobs", "1"]) == 0
    suite = load_suite("routers-smoke")
    records = ResultsStore(out).records()
    assert len(records) == len(plan_cells(suite))
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    by = {r["design"]: r for r in records}
    assert by["dense-early"]["routing"] == {}  # no MoE layer, no routing
    for design, record in by.items():
        if design == "dense-early":
            continue
        routing = record["routing"]
        layers = routing["layers"]
        model = record["config"]["model"]
        assert len(layers) == model["depth"] // model["moe"]["every"]  # one entry per MoE layer
        assert routing["max_mean_load"] >= 1.0
        experts = record["config"]["model"]["moe"]["num_experts"]
        assert routing["max_mean_load"] <= experts / 2 + 1e-9  # top-2: one expert holds at most half
        if design.startswith("top-p"):  # adaptive: fewer experts than E, at least one unless null
            assert 0 < routing["experts_per_token"] < experts
        elif design != "token-choice-priority":
            assert routing["experts_per_token"] == pytest.approx(2.0) and routing["dropped"] == 0
    # capacity 1.0 drops; the dropped share is what the experts per token lost
    priority = by["token-choice-priority"]["routing"]
    assert priority["dropped"] > 0
    assert priority["experts_per_token"] == pytest.approx(2 * (1 - priority["dropped"]), abs=1e-6)
    # top-p with the same parameters as top-2 spends fewer expert FLOPs when it takes fewer experts
    if by["top-p"]["routing"]["experts_per_token"] < 2:
        assert by["top-p"]["flops_components"]["experts"] < by["token-choice"]["flops_components"]["experts"]
    assert by["top-p"]["params"] == pytest.approx(by["token-choice"]["params"], rel=suite.tolerance)
    text = (out / "leaderboard.md").read_text()
    assert "## Routing" in text and "experts/token" in text
    rows = routing_tables(records)["tiny"]
    assert {row[0] for row in rows} == set(by) - {"dense-early"}
