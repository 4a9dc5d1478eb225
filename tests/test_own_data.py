"""Users' own data through the command line: the README's worked example, run as written,
on a manifest directory generated here; and the refusals that keep a run on its own data."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from modalmoe.cli import main
from modalmoe.data.convert import convert
from modalmoe.data.formats import load

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["walk", "run", "sit", "stand"]


def make_data(root: Path, n: int = 160, seed: int = 0) -> np.ndarray:
    """The raw files a user has: ``root/raw`` (``accel.npy`` [160, 50, 3], ``stats.npy``
    [160, 12], ``labels.txt``) and ``root/raw-new`` (30 more rows, no labels); returns the
    new rows' true labels. ``convert_data`` turns them into manifest directories."""
    rng = np.random.default_rng(seed)
    total = n + 30
    labels = rng.integers(0, 4, total)
    t = np.linspace(0, 1, 50)
    accel = np.stack(
        [np.sin(2 * np.pi * (labels[i] + 1) * t)[:, None] + 0.3 * rng.standard_normal((50, 3)) for i in range(total)]
    ).astype(np.float32)
    stats = (np.eye(4)[labels] @ rng.standard_normal((4, 12)) + 0.8 * rng.standard_normal((total, 12))).astype(
        np.float32
    )
    raw, new = root / "raw", root / "raw-new"
    raw.mkdir(parents=True)
    new.mkdir()
    np.save(raw / "accel.npy", accel[:n])
    np.save(raw / "stats.npy", stats[:n])
    (raw / "labels.txt").write_text("\n".join(np.array(CLASSES)[labels[:n]]) + "\n")
    np.save(new / "accel.npy", accel[n:])
    np.save(new / "stats.npy", stats[n:])
    return np.array(CLASSES)[labels[n:]]


def convert_data(root: Path) -> None:
    """What the README's two ``data convert`` lines do, through the API."""
    convert([root / "raw"], root / "my-data", name="my-sensors")
    convert([root / "raw-new"], root / "new-rows", unlabelled=True)


def readme_example() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- worked example: run by tests/test_own_data.py -->\n```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its worked example block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def readme_suite() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- worked example: run by tests/test_own_data.py -->")
    return re.search(r"```yaml\n(name: mine\n.*?)```", text[start:], re.S).group(1)


@pytest.mark.slow
def test_the_readme_worked_example_runs_on_generated_data(tmp_path):
    truth = make_data(tmp_path)
    (tmp_path / "my-suite.yaml").write_text(readme_suite())
    outputs, seconds = {}, {}
    for line in readme_example():
        args = shlex.split(line)
        assert args[0] == "modalmoe"
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "modalmoe", *args[1:]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "COLUMNS": "200"},
        )
        seconds[line] = time.perf_counter() - started
        assert result.returncode == 0, f"{line}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        outputs[line] = result.stdout
    print("\n".join(f"{s:7.1f} s  {line}" for line, s in seconds.items()))
    data = load(tmp_path / "my-data")
    sizes = {split: len(data.splits[split]) for split in ("train", "valid", "test")}
    assert sum(sizes.values()) == 160 and data.name == "my-sensors" and data.train.classes == tuple(sorted(CLASSES))

    def output(prefix: str) -> str:
        return next(out for line, out in outputs.items() if line.startswith(prefix))

    assert "modalmoe train generic/token-choice --data my-data" in output("modalmoe data convert raw ")
    assert "modalmoe predict RUN_DIR --input new-rows" in output("modalmoe data convert raw-new")
    described = output("modalmoe data describe")
    assert "my-sensors" in described and "baselines" in described
    run = tmp_path / "runs" / "mine"
    info = json.loads((run / "task.json").read_text())
    assert info["data"]["path"] == str((tmp_path / "my-data").resolve()) and info["data"]["hash"].startswith("xxh3")
    report = json.loads((run / "eval-test.json").read_text())
    subsets = {tuple(s["modalities"]): s["samples"] for s in report["subsets"]}
    test = sizes["test"]
    assert subsets == {("accel", "stats"): test, ("accel",): test, ("stats",): test}  # each modality missing in turn
    assert {n["level"] for n in report["noise"]} == {0, 1, 3}
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert [int(r["index"]) for r in rows] == list(range(30)) and "target" not in rows[0]
    assert {r["prediction"] for r in rows} <= set(CLASSES)
    assert sum(r["prediction"] == t for r, t in zip(rows, truth, strict=True)) > 30 / 4  # better than chance
    html = (run / "report.html").read_text()
    assert "my-sensors" in html and f"train {sizes['train']}, valid {sizes['valid']}, test {test}" in html
    folds = json.loads((tmp_path / "runs" / "mine-5fold" / "folds.json").read_text())
    assert len(folds["runs"]) == 5 and folds["test"]["accuracy"]["n"] == 5
    assert "5-fold test metrics" in output("modalmoe train generic/token-choice --data my-data --folds")
    records = [json.loads(line) for line in (tmp_path / "bench-mine" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["design"] for r in records) == ["dense-early", "token-choice"]
    assert all(r["task"] == "my-data" and r["status"] == "ok" for r in records)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    truth = make_data(root)
    convert_data(root)
    run = root / "run"
    code = main(
        ["train", "generic/dense-early", "--data", str(root / "my-data"), "--out", str(run), "--quiet"]
        + ["--set", "train.epochs=2"]
    )
    assert code == 0
    return root, run, truth


def test_labelled_new_rows_are_read_as_the_run_classes_and_indexed_by_input_row(trained, tmp_path):
    root, run, truth = trained
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    for name in ("accel", "stats"):
        (labelled / f"{name}.npz").write_bytes((root / "new-rows" / f"{name}.npz").read_bytes())
    np.savez(labelled / "labels.npz", label=truth)  # no `classes:`: sorted labels would be another order
    (labelled / "manifest.yaml").write_text(
        "modalities:\n  accel: {kind: sequence, file: accel.npz}\n  stats: {kind: vector, file: stats.npz}\n"
        "splits: {file: labels.npz}\n"
    )
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), "--input", str(labelled), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["target"] for r in rows] == truth.tolist()
    assert [int(r["index"]) for r in rows] == list(range(len(truth)))
    np.savez(labelled / "labels.npz", label=np.array(["walk"] * 29 + ["jump"]))
    assert main(["predict", str(run), "--input", str(labelled), "--out", str(out)]) == 2


def test_eval_and_analyze_refuse_changed_or_unrecorded_data(trained, tmp_path, capsys):
    root, run, _ = trained
    copy = tmp_path / "run"
    copy.mkdir()
    for item in run.iterdir():
        if item.is_file():
            (copy / item.name).write_bytes(item.read_bytes())
    (copy / "checkpoints").mkdir()
    for item in (run / "checkpoints").iterdir():
        (copy / "checkpoints" / item.name).write_bytes(item.read_bytes())
    assert main(["eval", str(copy), "--subsets", "none"]) == 0
    capsys.readouterr()
    # The data changes after training: refused, naming the directory; --data accepts it as it is.
    data = root / "my-data"
    original = (data / "stats.npz").read_bytes()
    stats = dict(np.load(data / "stats.npz"))
    stats["x"][0, 0] += 1.0
    np.savez(data / "stats.npz", **stats)
    try:
        assert main(["eval", str(copy), "--subsets", "none"]) == 2
        err = capsys.readouterr().out
        assert "changed since" in err and str(data) in err and "--data" in err
        assert main(["analyze", str(copy)]) == 2
        assert main(["eval", str(copy), "--subsets", "none", "--data", str(data)]) == 0
    finally:
        (data / "stats.npz").write_bytes(original)
    # A run that does not record its data (trained on an in-memory task) is refused too.
    info = json.loads((copy / "task.json").read_text())
    info["data"] = None
    (copy / "task.json").write_text(json.dumps(info))
    capsys.readouterr()
    assert main(["eval", str(copy), "--subsets", "none"]) == 2
    assert "does not record which data" in capsys.readouterr().out
    # The data directory is gone.
    info["data"] = {"kind": "directory", "path": str(tmp_path / "gone"), "hash": "xxh3-128:0"}
    (copy / "task.json").write_text(json.dumps(info))
    assert main(["analyze", str(copy)]) == 2
    assert "no longer exists" in capsys.readouterr().out


def test_a_bundled_preset_is_refused_for_other_data_and_generic_needs_data(trained, capsys):
    root, _, _ = trained
    assert main(["train", "watch-imu/token-choice", "--data", str(root / "my-data")]) == 2
    assert "generic/token-choice --data" in capsys.readouterr().out
    assert main(["train", "generic/token-choice"]) == 2
    assert main(["data", "describe", str(root / "my-data"), "--no-baselines"]) == 0
    assert "my-sensors" in capsys.readouterr().out
    assert main(["data", "describe", str(root / "nothing-here")]) == 2
