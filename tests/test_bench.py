"""The benchmark harness end to end on the smoke suite; resume after a kill; the CLI."""

import os
import signal
import subprocess
import sys
import time

import pytest

from modalmoe.bench.store import ResultsStore
from modalmoe.bench.suites import load_suite
from modalmoe.cli import main

SMOKE = load_suite("smoke")


# The smoke suite through the CLI is the default tier's one end-to-end test (a few seconds on
# 2 cores): `test_the_smoke_suite_runs_end_to_end` and the cheap checks that read its output.
# The kill-and-resume run and the extra imbalance bench are in the slow tier.
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke"
    assert main(["bench", "--suite", "smoke", "--out", str(out), "--jobs", "1"]) == 0
    return out


def test_the_smoke_suite_runs_end_to_end(smoke):
    records = ResultsStore(smoke).records()
    assert len(records) == (len(SMOKE.designs) - 1) * len(SMOKE.seeds) + 1  # logistic regression: one seed
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    trained = [r for r in records if r["design"] != "logistic-regression"]
    for r in trained:
        assert abs(r["matched"]["relative_error"]) <= SMOKE.tolerance  # compute matching held
        assert r["flops"] > 0 and r["active_params"] <= r["params"] and r["latency_b1_ms"] > 0
        assert len(r["evaluation"]["subsets"]) == 7  # every non-empty subset of three modalities
        assert r["environment"]["torch"] and r["config"]["train"]["seed"] == r["seed"]
    board = (smoke / "leaderboard.md").read_text()
    for design in SMOKE.designs:
        assert f"| {design}" in board
    assert "best dense" in board
    assert len((smoke / "results.csv").read_text().splitlines()) == len(records) + 1
    png = (smoke / "pareto-tiny.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_an_existing_bench_needs_resume_and_the_same_suite(smoke, capsys):
    assert main(["bench", "--suite", "smoke", "--out", str(smoke)]) == 2
    assert "--resume" in capsys.readouterr().out
    assert main(["bench", "--suite", "smoke", "--out", str(smoke), "--resume", "--set", "seeds=[0]"]) == 2
    assert "another suite" in capsys.readouterr().out
    assert main(["bench", "--suite", "smok"]) == 2
    assert "Did you mean 'smoke'" in capsys.readouterr().out


def test_compare_shows_both_directories(smoke, capsys, monkeypatch):
    from modalmoe import cli

    monkeypatch.setattr(cli.console, "width", 200)
    assert main(["bench", "compare", str(smoke), str(smoke)]) == 0
    out = capsys.readouterr().out
    assert "token-choice" in out and "0.0000" in out


@pytest.mark.slow
def test_resume_after_a_kill_skips_finished_cells_and_gives_the_same_results(smoke, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "modalmoe", "bench", "--suite", "smoke", "--out", str(out), "--jobs", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = ResultsStore(out)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if store.path.exists() and len(store.records()) >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the bench finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {(r["task"], r["design"], r["seed"]): r for r in store.records()}
    assert 4 <= len(before) < (len(SMOKE.designs) - 1) * len(SMOKE.seeds) + 1
    done = subprocess.run([*args, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    after = {(r["task"], r["design"], r["seed"]): r for r in store.records()}
    for key, record in before.items():
        assert after[key]["seconds"] == record["seconds"]  # not run again
    reference = {(r["task"], r["design"], r["seed"]): r for r in ResultsStore(smoke).records()}
    assert set(after) == set(reference)
    for key, record in after.items():
        assert record["metrics"] == pytest.approx(reference[key]["metrics"], abs=1e-6), key


@pytest.mark.slow
def test_imbalanced_training_cells_run_and_show_up_as_their_own_rows(tmp_path):
    from modalmoe.bench.runner import plan_cells, run_bench

    suite = load_suite(
        "smoke", ["designs=[token-choice]", "seeds=[0]", "robustness.imbalance=[0.2]", "robustness.noise=[]"]
    )
    cells = plan_cells(suite)
    assert [c.label for c in cells] == [
        "token-choice",
        "token-choice@m0=0.2",
        "token-choice@m1=0.2",
        "token-choice@m2=0.2",
    ]
    records = run_bench(suite, tmp_path / "b", jobs=1, progress=False)
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    board = (tmp_path / "b" / "leaderboard.md").read_text()
    assert "token-choice@m1=0.2" in board


def test_analyze_a_bench_directory_writes_an_index_of_routing_consistency(smoke):
    assert main(["analyze", str(smoke)]) == 0
    index = (smoke / "routing" / "index.html").read_text()
    assert 'href="tiny.html"' in index and (smoke / "routing" / "tiny.html").stat().st_size > 10_000
    for design in ("token-choice", "modality-experts", "token-choice-bank"):
        assert f"<td>{design}</td>" in index
    # modality experts route by modality by construction: NMI(expert; modality) is 1 on every seed
    assert "<td>modality-experts</td><td>0</td><td>2</td><td>1.000 ± 0.000</td>" in index


def test_profile_of_a_bench_run_agrees_with_its_record(smoke, tmp_path):
    record = next(r for r in ResultsStore(smoke).records() if r["design"] == "token-choice" and r["seed"] == 0)
    out = tmp_path / "profile.json"
    assert main(["profile", str(smoke / record["run_dir"]), "--repeats", "3", "--json", str(out)]) == 0
    import json

    numbers = json.loads(out.read_text())
    assert numbers["flops_per_sample"] == record["flops"]
    assert numbers["params"] == record["params"] and numbers["active_params"] == record["active_params"]
    assert numbers["latency_b1_ms"]["p50_ms"] <= numbers["latency_b1_ms"]["p95_ms"]
    assert numbers["throughput_samples_per_s"] > 0 and sum(numbers["flops_by_component"].values()) > 0
    assert main(["profile", "tiny/soft", "--repeats", "3"]) == 0  # a preset, built untrained
