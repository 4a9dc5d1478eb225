"""`modalmoe bench` with lifelong protocols: the lifelong-smoke suite end to end (stage 1 once
per seed, stage 2 per method), the stored forgetting and gain agree with the stored metrics,
resume skips finished cells, failures are recorded per cell, and the Lifelong table."""

import json

import pytest

from modalmoe.bench import runner
from modalmoe.bench.lifelong import LifelongCell, plan_lifelong
from modalmoe.bench.store import ResultsStore
from modalmoe.bench.suites import load_suite, suite_names
from modalmoe.cli import main
from modalmoe.config import ConfigError

SUITE = load_suite("lifelong-smoke")
PROTOCOL = SUITE.lifelong[0]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "lifelong"
    assert main(["bench", "--suite", "lifelong-smoke", "--out", str(out), "--jobs", "1"]) == 0
    return out


def _by_key(records):
    return {(r["design"], r["seed"]): r for r in records}


@pytest.mark.slow
def test_every_method_and_seed_has_a_record_with_the_lifelong_block(bench):
    records = _by_key(ResultsStore(bench).records())
    assert len(records) == len(SUITE.seeds) * (1 + len(PROTOCOL.methods))  # stage 1 once per seed
    assert all(r["status"] == "ok" for r in records.values()), [r.get("error") for r in records.values()]
    for seed in SUITE.seeds:
        stage1 = records[("token-choice:m0+m1", seed)]
        assert stage1["lifelong"] == {"stage": 1, "protocol": "token-choice:m0+m1>+m2", "modalities": ["m0", "m1"]}
        assert stage1["config"]["modalities"] == ["m0", "m1"] and stage1["config"]["train"]["seed"] == seed
        for method, spec in PROTOCOL.methods.items():
            r = records[(f"token-choice:m0+m1>+m2:{method}", seed)]
            block = r["lifelong"]
            assert block["stage"] == 2 and block["method"] == method and block["add"] == ["m2"]
            assert r["config"]["modalities"] == ["m0", "m1", "m2"] and r["config"]["train"]["seed"] == seed
            assert r["config"]["train"]["grow"]["freeze"] == spec.freeze
            assert r["config"]["model"]["missing"]["dropout"] == PROTOCOL.dropout
            assert r["config"]["model"]["moe"]["num_experts"] == 4 + spec.experts
            assert r["config"]["train"]["init_from"].endswith(stage1["run_dir"])  # grown from its seed's stage 1
            assert r["flops"] > 0 and 0 < r["active_params"] <= r["params"] and r["latency_b1_ms"] > 0
            assert len(r["evaluation"]["subsets"]) == 7  # every subset of m0, m1, m2


@pytest.mark.slow
def test_forgetting_and_gain_are_computed_from_the_stored_accuracies(bench):
    records = _by_key(ResultsStore(bench).records())
    for seed in SUITE.seeds:
        before = records[("token-choice:m0+m1", seed)]["metrics"]["accuracy"]
        for method in PROTOCOL.methods:
            r = records[(f"token-choice:m0+m1>+m2:{method}", seed)]
            block = r["lifelong"]
            subsets = {tuple(s["modalities"]): s["metrics"]["accuracy"] for s in r["evaluation"]["subsets"]}
            assert block["old_before"] == before  # the stage-1 model, measured again by the stage-2 cell
            assert block["old_after"] == subsets[("m0", "m1")]
            assert block["new_after"] == subsets[("m2",)]
            assert block["all_after"] == r["metrics"]["accuracy"] == subsets[("m0", "m1", "m2")]
            assert block["forgetting"] == pytest.approx(before - block["old_after"], abs=1e-12)
            assert block["gain"] == pytest.approx(block["all_after"] - before, abs=1e-12)
        # freeze: old fixes everything stage 1 learned, so the old modalities predict exactly as before.
        assert records[("token-choice:m0+m1>+m2:freeze-old", seed)]["lifelong"]["forgetting"] == 0.0


@pytest.mark.slow
def test_the_leaderboard_has_a_lifelong_table(bench):
    board = (bench / "leaderboard.md").read_text()
    assert "## Lifelong" in board and "### tiny: token-choice, m0 + m1 → + m2 (accuracy %)" in board
    table = board.split("## Lifelong")[1]
    records = ResultsStore(bench).records()
    for method, spec in PROTOCOL.methods.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:5] == [str(spec.experts), spec.freeze, f"{spec.ewc:g}", str(len(SUITE.seeds))]
        forgetting = [
            100 * r["lifelong"]["forgetting"] for r in records if r.get("lifelong", {}).get("method") == method
        ]
        assert cells[5].startswith(f"{sum(forgetting) / len(forgetting):.1f} ± ")
    assert "| token-choice:m0+m1>+m2:grow |" in board  # and the usual rows, metric with all modalities
    assert "lifelong.forgetting" in (bench / "results.csv").read_text().splitlines()[0]


@pytest.mark.slow
def test_resume_runs_only_the_unfinished_cells(bench, monkeypatch):
    store = ResultsStore(bench)
    records = store.records()
    dropped = next(r for r in records if r["design"].endswith(":naive") and r["seed"] == SUITE.seeds[-1])
    store.path.write_text("".join(json.dumps(r) + "\n" for r in records if r is not dropped))
    ran, original = [], runner.run_cell
    monkeypatch.setattr(runner, "run_cell", lambda cell, *a, **k: ran.append(cell.key) or original(cell, *a, **k))
    assert main(["bench", "--suite", "lifelong-smoke", "--out", str(bench), "--jobs", "1", "--resume"]) == 0
    assert ran == [("tiny", dropped["design"], dropped["seed"])]
    after = store.records()
    assert len(after) == len(records) and after[-1]["design"] == dropped["design"]  # appended again
    assert after[-1]["seed"] == dropped["seed"] and after[-1]["lifelong"] == dropped["lifelong"]  # deterministic
    assert after[:-1] == [r for r in records if r is not dropped]  # the finished cells were left alone


@pytest.mark.slow
def test_a_failed_cell_is_recorded_and_the_others_run(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: lifelong-fail\nseeds: [0]\nmatch: none\noverrides: [train.epochs=1]\n"
        "lifelong:\n  - {task: tiny, design: token-choice, first: [m0], add: [m1], methods: {"
        "ok: {freeze: old}, bad: {freeze: none, overrides: [train.grow.frezze=old]}}}\n"
    )
    out = tmp_path / "out"
    assert main(["bench", "--suite", str(suite), "--out", str(out), "--jobs", "2"]) == 1  # in worker processes
    records = _by_key(ResultsStore(out).records())
    assert records[("token-choice:m0>+m1:ok", 0)]["status"] == "ok"
    bad = records[("token-choice:m0>+m1:bad", 0)]
    assert bad["status"] == "failed" and "frezze" in bad["error"]
    # A stage 2 whose stage-1 run is missing says so instead of training from nothing.
    cell = next(c for c in plan_lifelong(load_suite(str(suite))) if c.method == "ok")
    assert isinstance(cell, LifelongCell) and cell.needs == ("tiny", "token-choice:m0", 0)
    record = runner.run_cell(cell, load_suite(str(suite)).model_dump(mode="json"), None, str(tmp_path / "empty"), 1)
    assert record["status"] == "failed" and "has no finished run" in record["error"] and "--resume" in record["error"]


@pytest.mark.parametrize(
    ("protocol", "match"),
    [
        ("{task: tiny, design: token-choice, first: [m0], add: [m0], methods: {a: {freeze: old}}}", "distinct"),
        ("{task: tiny, design: token-choice, first: [m0], add: [m1], methods: {a: {experts: 1}}}", "freeze"),
        ("{task: tiny, design: token-choice, first: [m0], add: [m1], methods: {'a:b': {freeze: old}}}", "free of"),
        ("{task: tiny, design: token-choice, first: [m0], add: [m1], methods: {}}", "methods"),
        ("{task: nope, design: token-choice, first: [m0], add: [m1], methods: {a: {freeze: old}}}", "unknown tasks"),
    ],
)
def test_protocols_are_validated(tmp_path, protocol, match):
    path = tmp_path / "suite.yaml"
    path.write_text(f"name: x\nlifelong:\n  - {protocol}\n")
    with pytest.raises(ConfigError, match=match):
        load_suite(str(path))


def test_unknown_modalities_and_empty_suites_are_refused(tmp_path, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text("name: x\nlifelong:\n  - {task: tiny, design: token-choice, first: [m0], add: [m7], "
                    "methods: {a: {freeze: old}}}\n")  # fmt: skip
    assert main(["bench", "--suite", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "has no modalities ['m7']; its modalities are ['m0', 'm1', 'm2']" in " ".join(
        capsys.readouterr().out.split()
    )
    path.write_text("name: x\n")
    with pytest.raises(ConfigError, match="needs both tasks and designs"):
        load_suite(str(path))


@pytest.mark.parametrize("name", suite_names())
def test_every_shipped_suite_validates_and_its_lifelong_protocols_plan(name):
    suite = load_suite(name)
    cells = plan_lifelong(suite)
    stage1 = {c.key for c in cells if c.method is None}
    assert len(cells) == len(stage1) + len(suite.seeds) * sum(len(p.methods) for p in suite.lifelong)
    assert all(c.needs in stage1 for c in cells if c.method is not None)
