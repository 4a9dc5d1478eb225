"""`modalmoe bench` with task sequences: the sequence-smoke suite end to end (the first task
once per seed, each later stage continuing the previous one of its method, each task alone
for forward transfer), every stage scores every task it learned, frozen methods keep earlier
tasks exactly, the table agrees with the stored scores, and bad protocols are refused."""

import statistics

import pytest

from modalmoe.bench import runner
from modalmoe.bench.sequence import SequenceCell, plan_sequences, sequence_tables
from modalmoe.bench.store import ResultsStore
from modalmoe.bench.suites import load_suite, suite_names
from modalmoe.cli import main
from modalmoe.config import ConfigError

SUITE = load_suite("sequence-smoke")
PROTOCOL = SUITE.sequences[0]
LABELS = PROTOCOL.labels  # t1, t2, t3


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "sequence"
    assert main(["bench", "--suite", "sequence-smoke", "--out", str(out), "--jobs", "1"]) == 0
    return out


def _by_key(records):
    return {(r["design"], r["seed"]): r for r in records}


def test_cells_are_planned_after_the_stage_they_continue():
    cells = plan_sequences(SUITE)
    seeds, steps = len(SUITE.seeds), len(LABELS)
    assert len(cells) == seeds * (steps + (steps - 1) * len(PROTOCOL.methods))  # each task alone + the stages
    seen = set()
    for cell in cells:
        assert isinstance(cell, SequenceCell)
        assert cell.needs is None or cell.needs in seen, cell  # runner.run_bench relies on this order
        seen.add(cell.key)
    assert {c.label for c in cells if c.method == "naive"} == {
        "token-choice:t1>t2:naive",
        "token-choice:t1>t2>t3:naive",
    }
    third = next(c for c in cells if c.label == "token-choice:t1>t2>t3:naive")
    assert third.needs == ("tiny", "token-choice:t1>t2:naive", SUITE.seeds[0])


@pytest.mark.slow
def test_every_stage_scores_every_task_it_learned(bench):
    records = _by_key(ResultsStore(bench).records())
    assert all(r["status"] == "ok" for r in records.values()), [r.get("error") for r in records.values()]
    for seed in SUITE.seeds:
        first = records[("token-choice:t1", seed)]
        assert first["sequence"]["scores"] == {"t1": first["metrics"]["accuracy"]}
        assert first["config"]["task_options"]["seed"] == 1
        for method, spec in PROTOCOL.methods.items():
            for step in (1, 2):
                r = records[(PROTOCOL.stage_label(step, method), seed)]
                block = r["sequence"]
                assert list(block["scores"]) == LABELS[: step + 1] and block["task"] == LABELS[step]
                assert block["scores"][LABELS[step]] == r["metrics"]["accuracy"]
                tasks = r["config"]["model"]["tasks"]
                assert [t["name"] for t in tasks] == LABELS[: step + 1]
                # Each step's data is its own options over the task file's: t2's 8 classes do not leak into t3.
                assert tasks[step]["data_options"] == {"num_samples": 120, "dim": 8, **PROTOCOL.sequence[step].options}
                assert r["config"]["model"]["moe"]["num_experts"] == 4 + step * spec.experts
                assert r["config"]["train"]["grow"] == {
                    "modalities": [], "task": LABELS[step], "experts": spec.experts, "freeze": spec.freeze,
                    "ewc": spec.ewc, "fisher_samples": spec.fisher_samples or 512,
                }  # fmt: skip
        # Freezing everything old keeps every earlier task's score exactly.
        two, three = (records[(PROTOCOL.stage_label(k, "grow"), seed)]["sequence"]["scores"] for k in (1, 2))
        assert two["t1"] == three["t1"] == first["metrics"]["accuracy"]
        assert three["t2"] == two["t2"]


@pytest.mark.slow
def test_the_table_agrees_with_the_stored_scores(bench):
    records = ResultsStore(bench).records()
    by_key = _by_key(records)
    (key, rows), = sequence_tables(records, SUITE).items()  # fmt: skip
    assert key == ("tiny", "token-choice:t1>t2>t3") and [r["method"] for r in rows] == ["alone", *PROTOCOL.methods]
    seed = SUITE.seeds[0]
    alone = {t: by_key[(PROTOCOL.alone_label(k), seed)]["metrics"]["accuracy"] for k, t in enumerate(LABELS)}
    assert rows[0]["final"] == [pytest.approx(100 * statistics.mean(alone.values()))]
    for row in rows[1:]:
        stages = [by_key[(PROTOCOL.stage_label(k, row["method"]), seed)]["sequence"]["scores"] for k in (1, 2)]
        learned = {"t1": alone["t1"], "t2": stages[0]["t2"], "t3": stages[1]["t3"]}
        final = stages[1]
        assert row["final"] == [pytest.approx(100 * statistics.mean(final.values()))]
        forgetting = statistics.mean(learned[t] - final[t] for t in ("t1", "t2"))
        assert row["forgetting"] == [pytest.approx(100 * forgetting)]
        transfer = statistics.mean(learned[t] - alone[t] for t in ("t2", "t3"))
        assert row["transfer"] == [pytest.approx(100 * transfer)]
    board = (bench / "leaderboard.md").read_text()
    assert "## Task sequences" in board and "### tiny: token-choice, tasks t1 → t2 → t3 (accuracy %)" in board
    assert "| token-choice:t1>t2>t3:grow |" in board  # and the usual rows, each stage's current task


def test_a_stage_whose_previous_stage_is_missing_fails_with_a_clear_error(tmp_path):
    cell = next(c for c in plan_sequences(SUITE) if c.step == 2 and c.method is not None)
    record = runner.run_cell(cell, SUITE.model_dump(mode="json"), None, str(tmp_path / "empty"), 1)
    assert record["status"] == "failed" and "has no finished run" in record["error"] and "--resume" in record["error"]


@pytest.mark.parametrize(
    ("protocol", "match"),
    [
        ("{task: tiny, design: token-choice, sequence: [{label: a}], methods: {m: {freeze: old}}}", "at least 2"),
        ("{task: tiny, design: token-choice, sequence: [{label: a}, {label: a}], methods: {m: {freeze: old}}}",
         "distinct"),
        ("{task: tiny, design: token-choice, sequence: [{label: a}, {label: 'b>c'}], methods: {m: {freeze: old}}}",
         "free of"),
        ("{task: tiny, design: logistic-regression, sequence: [{label: a}, {label: b}], methods: {m: {freeze: old}}}",
         "trained design"),
    ],
)  # fmt: skip
def test_sequences_are_validated(tmp_path, protocol, match):
    path = tmp_path / "suite.yaml"
    path.write_text(f"name: x\nsequences:\n  - {protocol}\n")
    with pytest.raises(ConfigError, match=match):
        load_suite(str(path))


@pytest.mark.parametrize("name", suite_names())
def test_every_shipped_suite_plans_its_sequences(name):
    suite = load_suite(name)
    cells = plan_sequences(suite)
    keys = {c.key for c in cells}
    assert all(c.needs in keys for c in cells if c.needs is not None)
