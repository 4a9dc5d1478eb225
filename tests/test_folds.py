"""K-fold protocols: folds as tasks (every sample tested once, stratified, grouped, seeded),
``train --folds`` and ``eval`` on its directory, and bench suites with ``folds``."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from modalmoe.bench.cells import plan_cells
from modalmoe.bench.suites import SuiteConfig
from modalmoe.cli import main
from modalmoe.data.batch import ModalitySpec, MultimodalDataset, Task, concat
from modalmoe.data.convert import convert
from modalmoe.data.folds import fold_task
from modalmoe.data.formats import DataFormatError
from modalmoe.data.tasks import load_task


def small_task(n: int = 90, groups: bool = False) -> Task:
    rng = np.random.default_rng(0)
    spec = {"x": ModalitySpec("x", "vector", (4,)), "s": ModalitySpec("s", "sequence", (None, 2))}
    target = np.arange(n) % 3

    def part(rows, steps):
        return MultimodalDataset(
            specs=spec,
            inputs={"x": rng.normal(size=(len(rows), 4)), "s": rng.normal(size=(len(rows), steps, 2))},
            target=target[rows],
            lengths={"s": np.full(len(rows), steps)},
            classes=("a", "b", "c"),
            groups=(rows // 6) if groups else None,
            extras={"row": rows},
        )

    rows = np.arange(n)
    splits = {"train": part(rows[:60], 7), "valid": part(rows[60:75], 9), "test": part(rows[75:], 5)}
    return Task("small", splits)


def rows_of(data: MultimodalDataset) -> list[int]:
    return data.extras["row"].tolist()


def test_every_sample_is_tested_once_and_the_splits_of_a_fold_are_disjoint():
    task = small_task()
    tested = []
    for fold in range(5):
        f = fold_task(task, folds=5, fold=fold, fold_seed=1)
        train, valid, test = (rows_of(f.splits[s]) for s in ("train", "valid", "test"))
        assert not set(train) & set(valid) and not set(train) & set(test) and not set(valid) & set(test)
        assert sorted(train + valid + test) == list(range(90))
        assert len(test) == 18 and len(valid) == 18 and len(train) == 54
        counts = np.bincount(f.test.target.numpy(), minlength=3)
        assert counts.max() - counts.min() <= 1  # stratified
        tested += test
    assert sorted(tested) == list(range(90))


def test_folds_are_seeded_and_sequences_padded_to_the_longest():
    task = small_task()
    a = fold_task(task, folds=3, fold=0, fold_seed=0)
    assert rows_of(a.test) == rows_of(fold_task(task, folds=3, fold=0, fold_seed=0).test)
    assert rows_of(a.test) != rows_of(fold_task(task, folds=3, fold=0, fold_seed=1).test)
    assert a.train.inputs["s"].shape[1] == 9
    pooled = concat([task.train, task.valid, task.test])
    assert pooled.lengths["s"].tolist() == [7] * 60 + [9] * 15 + [5] * 15
    assert torch.equal(pooled.inputs["s"][60:75], task.valid.inputs["s"])


def test_grouped_data_keeps_each_group_in_one_fold():
    task = small_task(groups=True)
    for fold in range(3):
        f = fold_task(task, folds=3, fold=fold)
        groups = {s: set(f.splits[s].groups.tolist()) for s in f.splits}
        assert not groups["train"] & groups["test"] and not groups["valid"] & groups["test"]


def test_fold_options_are_checked():
    with pytest.raises(DataFormatError, match="a fold needs both folds"):
        load_task("synthetic", fold=1)
    with pytest.raises(DataFormatError, match="K >= 3"):
        load_task("synthetic", folds=2, fold=0)
    with pytest.raises(DataFormatError, match=r"fold 3: one of 0..2"):
        load_task("synthetic", folds=3, fold=3)
    task = load_task("synthetic", folds=3, fold=1, fold_seed=2)
    assert "fold 1 of 3" in task.description


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("folds")
    raw = root / "raw"
    raw.mkdir()
    rng = np.random.default_rng(1)
    labels = np.arange(45) % 3
    np.save(raw / "x.npy", (np.eye(3)[labels] @ rng.normal(size=(3, 6)) + 0.5 * rng.normal(size=(45, 6))))
    np.save(raw / "s.npy", rng.normal(size=(45, 12, 2)).astype(np.float32))
    np.save(raw / "labels.npy", labels)
    return convert([raw], root / "data").path


def test_train_folds_then_eval_reports_the_mean_and_interval_over_folds(data_dir, tmp_path, capsys):
    out = tmp_path / "k"
    args = ["train", "generic/token-choice", "--data", str(data_dir), "--folds", "3", "--out", str(out), "--quiet",
            "--set", "train.epochs=1", "--set", "train.batch_size=16"]  # fmt: skip
    assert main(args) == 0
    record = json.loads((out / "folds.json").read_text())
    assert record["folds"] == 3 and [r["run"] for r in record["runs"]] == ["fold-0", "fold-1", "fold-2"]
    accuracy = record["test"]["accuracy"]
    assert accuracy["n"] == 3 and accuracy["mean"] == pytest.approx(np.mean(accuracy["values"]))
    assert accuracy["ci_low"] <= accuracy["mean"] <= accuracy["ci_high"]
    config = (out / "fold-2" / "config.yaml").read_text()
    assert "folds: 3" in config and "fold: 2" in config
    assert "3-fold test metrics" in capsys.readouterr().out
    # A second start is refused; --resume keeps the finished folds as they are.
    assert main(args) == 2
    before = (out / "fold-0" / "checkpoints" / "best.safetensors").stat().st_mtime_ns
    assert main([*args, "--resume"]) == 0
    assert (out / "fold-0" / "checkpoints" / "best.safetensors").stat().st_mtime_ns == before
    capsys.readouterr()
    assert main(["eval", str(out), "--noise", "1"]) == 0
    report = json.loads((out / "eval-test.json").read_text())
    assert report["folds"]["runs"] == 3 and report["folds"]["samples"] == 45  # every sample tested once
    subsets = {tuple(r["modalities"]) for r in report["folds"]["subsets"]}
    assert subsets == {("s", "x"), ("s",), ("x",)} or subsets == {("x", "s"), ("x",), ("s",)}
    assert "Mean over 3 folds" in capsys.readouterr().out
    # Each fold run is an ordinary run: analyze reads its own fold again.
    assert main(["analyze", str(out / "fold-1")]) == 0
    html = (out / "fold-1" / "report.html").read_text()
    assert "train 15, valid 15, test 15" in html  # K - 2 = 1 fold trains


def test_a_small_training_split_gets_a_warning_that_suggests_folds(data_dir, tmp_path, capsys):
    assert main(["train", "generic/dense-early", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--quiet",
                 "--set", "train.epochs=1"]) == 0  # fmt: skip
    assert "training samples" in capsys.readouterr().out.replace("\n", " ")


def test_a_suite_with_folds_plans_one_cell_per_seed_and_fold(data_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        suite = SuiteConfig(name="k", tasks=[str(data_dir)], designs=["dense-early", "logistic-regression"],
                            seeds=[0, 1], folds=3)  # fmt: skip
    cells = plan_cells(suite)
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys)) == 2 * 2 * 3 - 3  # logistic regression: the first seed's folds only
    dense = [c for c in cells if c.design == "dense-early"]
    assert [(c.seed, c.fold) for c in dense] == [(s * 3 + f, (3, f, s)) for s in (0, 1) for f in range(3)]
    with pytest.raises(ValueError):
        SuiteConfig(name="k", tasks=[str(data_dir)], designs=["dense-early"], folds=2)
