"""``modalmoe data convert``: each input format to a manifest directory that loads, with the
splits, kinds and labels the input implies, and clear errors that leave nothing behind."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from modalmoe.cli import main
from modalmoe.data.convert import ConvertError, convert
from modalmoe.data.formats import load
from modalmoe.data.formats.rows import load_rows

rng = np.random.default_rng(0)


def arrays_dir(root: Path, n: int = 60) -> Path:
    d = root / "raw"
    d.mkdir()
    np.save(d / "imu.npy", rng.normal(size=(n, 20, 6)).astype(np.float32))
    np.save(d / "camera.npy", rng.normal(size=(n, 8, 8, 3)).astype(np.float32))  # channels last
    np.save(d / "notes.npy", np.array([f"note {i} about the day" for i in range(n)]))
    (d / "labels.txt").write_text("\n".join(["walk", "run", "sit"][i % 3] for i in range(n)) + "\n")
    return d


def write_ts(path: Path, n: int, *, dims: int = 4, missing: bool = True, labels=("up", "down")) -> None:
    lines = ["# made by tests/test_convert.py", "@problemName Toy", "@timeStamps false", "@missing true",
             "@univariate false", f"@dimensions {dims}", "@equalLength false",
             f"@classLabel true {' '.join(labels)}", "@data"]  # fmt: skip
    for i in range(n):
        length = 10 + i % 6
        series = []
        for d in range(dims):
            values = [f"{v:.3f}" for v in rng.normal(size=length)]
            if missing and d == 1:
                values[3] = "?"
            series.append(",".join(values))
        lines.append(":".join(series) + ":" + labels[i % len(labels)])
    path.write_text("\n".join(lines) + "\n")


def test_a_directory_of_arrays_becomes_a_manifest_with_kinds_from_shapes(tmp_path):
    done = convert([arrays_dir(tmp_path)], tmp_path / "my-data")
    task = load(done.path)
    assert {m: s.kind for m, s in task.specs.items()} == {"camera": "image", "imu": "sequence", "notes": "text"}
    assert task.specs["camera"].shape == (3, 8, 8)  # moved to channels-first
    assert task.train.classes == ("run", "sit", "walk")
    assert done.split_sizes == {s: len(task.splits[s]) for s in ("train", "valid", "test")}
    assert sum(done.split_sizes.values()) == 60 and done.split_sizes["test"] == 9 and done.split_sizes["valid"] == 9
    for split in task.splits.values():  # stratified: each class in every split
        assert sorted(set(split.target.tolist())) == [0, 1, 2]


def test_modality_option_splits_an_array_s_channels(tmp_path):
    raw = arrays_dir(tmp_path)
    done = convert([raw], tmp_path / "out", modality=["accel=imu.npy:0-2", "gyro=imu:3,4,5"])
    task = load(done.path)
    assert list(task.specs) == ["accel", "gyro"]
    imu = np.load(raw / "imu.npy")
    assert task.specs["gyro"].shape == (None, 3)
    x = np.concatenate([task.splits[s].inputs["gyro"].numpy() for s in ("train", "valid", "test")])
    assert sorted(map(tuple, x[:, 0, :].round(4))) == sorted(map(tuple, imu[:, 0, 3:].round(4)))


def test_the_carved_splits_are_seeded(tmp_path):
    raw = arrays_dir(tmp_path)
    a = load(convert([raw], tmp_path / "a", seed=3).path)
    b = load(convert([raw], tmp_path / "b", seed=3).path)
    c = load(convert([raw], tmp_path / "c", seed=4).path)
    assert np.array_equal(a.test.inputs["imu"].numpy(), b.test.inputs["imu"].numpy())
    assert not np.array_equal(a.test.inputs["imu"].numpy(), c.test.inputs["imu"].numpy())


def test_an_all_nan_sample_lacks_the_modality_and_a_partial_nan_is_refused(tmp_path):
    raw = arrays_dir(tmp_path)
    x = np.load(raw / "imu.npy")
    x[5] = np.nan
    np.save(raw / "imu.npy", x)
    done = convert([raw], tmp_path / "out")
    assert "1 absent" in done.modalities["imu"]
    task = load(done.path)
    assert sum(int((~task.splits[s].present["imu"]).sum()) for s in task.splits) == 1
    x[7, 0, 0] = np.nan
    np.save(raw / "imu.npy", x)
    with pytest.raises(ConvertError, match=r"modality 'imu': sample 7 holds NaN"):
        convert([raw], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out2")]  # no temporary left behind


def test_an_existing_directory_is_kept_unless_overwrite(tmp_path):
    raw = arrays_dir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ConvertError, match="already holds files.*--overwrite"):
        convert([raw], out)
    assert (out / "mine.txt").read_text() == "keep me"
    convert([raw], out, overwrite=True)
    assert not (out / "mine.txt").exists() and load(out).name == "out"


def test_missing_labels_and_object_arrays_are_named(tmp_path):
    raw = arrays_dir(tmp_path)
    (raw / "labels.txt").unlink()
    with pytest.raises(ConvertError, match=r"no labels file .*--labels FILE.*--unlabelled"):
        convert([raw], tmp_path / "out")
    np.save(raw / "y.npy", np.array([0, 1, 2] * 20))
    assert load(convert([raw], tmp_path / "out").path).train.classes == ("0", "1", "2")
    np.save(raw / "bad.npy", np.array([{"a": 1}] * 60, dtype=object), allow_pickle=True)
    with pytest.raises(ConvertError, match=r"bad.npy: holds Python objects"):
        convert([raw], tmp_path / "out2")


def test_unlabelled_arrays_are_rows_to_predict(tmp_path):
    raw = arrays_dir(tmp_path)
    done = convert([raw], tmp_path / "new", unlabelled=True)
    assert done.split_sizes == {} and not (done.path / "index.parquet").exists()
    rows = load_rows(done.path)
    assert len(rows.index) == 60 and not rows.labelled and rows.index.tolist() == list(range(60))
    assert np.allclose(rows.dataset.inputs["imu"].numpy(), np.load(raw / "imu.npy"))


def write_csv(path: Path, n: int = 60) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "hr", "bp_sys", "bp_dia", "sex", "note", "outcome"])
        for i in range(n):
            w.writerow([i, rng.normal(), rng.normal(), "" if i == 3 else rng.normal(), "mf"[i % 2],
                        f"patient {i} feels fine today", "ab"[i % 2]])  # fmt: skip


def test_a_csv_table_becomes_one_modality_per_column_group(tmp_path):
    write_csv(tmp_path / "t.csv")
    done = convert([tmp_path / "t.csv"], tmp_path / "out", label="outcome",
                   modality=["vitals=hr,bp_*", "demo=sex", "note=note"])  # fmt: skip
    task = load(done.path)
    assert {m: s.kind for m, s in task.specs.items()} == {"vitals": "tabular", "demo": "tabular", "note": "text"}
    assert task.specs["vitals"].columns == ("hr", "bp_sys", "bp_dia")
    assert task.specs["demo"].categorical == {0: 3} and task.specs["demo"].categories == {0: ("f", "m")}
    pooled = sum(int((~task.splits[s].present["vitals"]).sum()) for s in task.splits)
    assert pooled == 1  # the empty cell: that sample lacks the modality


def test_table_errors_name_the_column_and_the_fix(tmp_path):
    write_csv(tmp_path / "t.csv")
    with pytest.raises(ConvertError, match=r"no label column 'label'.*--label COLUMN"):
        convert([tmp_path / "t.csv"], tmp_path / "out")
    with pytest.raises(ConvertError, match=r"'pulse' matches no column"):
        convert([tmp_path / "t.csv"], tmp_path / "out", label="outcome", modality=["v=pulse"])
    with pytest.raises(ConvertError, match=r"column 'hr' is in modality 'a' too"):
        convert([tmp_path / "t.csv"], tmp_path / "out", label="outcome", modality=["a=hr", "b=h*"])
    with pytest.raises(ConvertError, match=r"'outcome' is the label or split column"):
        convert([tmp_path / "t.csv"], tmp_path / "out", label="outcome", modality=["a=outcome"])
    with pytest.raises(ConvertError, match=r"--labels does not apply to a table"):
        convert([tmp_path / "t.csv"], tmp_path / "out", label="outcome", labels="x.txt")


def test_train_and_test_files_are_splits_and_valid_is_carved_from_train(tmp_path):
    write_ts(tmp_path / "Toy_TRAIN.ts", 40)
    write_ts(tmp_path / "Toy_TEST.ts", 20)
    done = convert([tmp_path / "Toy_TRAIN.ts", tmp_path / "Toy_TEST.ts"], tmp_path / "toy",
                   modality=["a=0-1", "b=2,3"])  # fmt: skip
    assert done.split_sizes["test"] == 20 and done.split_sizes["train"] + done.split_sizes["valid"] == 40
    task = load(done.path)
    assert task.train.classes == ("up", "down")  # the order @classLabel declares
    assert task.specs["a"].shape == (None, 2) and task.train.lengths["a"].max() == 15
    assert any("filled by linear interpolation" in n for n in done.notes)
    assert np.isfinite(task.train.inputs["a"].numpy()).all()


def test_ts_options_out_of_range_and_unnamed_split_files_are_refused(tmp_path):
    write_ts(tmp_path / "Toy_TRAIN.ts", 12)
    write_ts(tmp_path / "other.ts", 12)
    with pytest.raises(ConvertError, match=r"dimension 7 is out of range; the input has 4"):
        convert([tmp_path / "Toy_TRAIN.ts"], tmp_path / "out", modality=["a=7"])
    with pytest.raises(ConvertError, match=r"other.ts: several input files .* must name one"):
        convert([tmp_path / "Toy_TRAIN.ts", tmp_path / "other.ts"], tmp_path / "out")
    with pytest.raises(ConvertError, match=r"--modality 'acc': expected NAME=VALUE"):
        convert([tmp_path / "Toy_TRAIN.ts"], tmp_path / "out", modality=["acc"])


def test_a_relational_arff_is_a_multivariate_series(tmp_path):
    lines = ["@relation toy", "@attribute rel relational", *[f"@attribute t{i} numeric" for i in range(5)],
             "@end rel", "@attribute class {x,y}", "@data"]  # fmt: skip
    for i in range(30):
        block = "\\n".join(",".join(f"{v:.2f}" for v in rng.normal(size=5)) for _ in range(3))
        lines.append(f"'{block}',{'xy'[i % 2]}")
    (tmp_path / "Toy_TRAIN.arff").write_text("\n".join(lines) + "\n")
    done = convert([tmp_path / "Toy_TRAIN.arff"], tmp_path / "out", modality=["a=0", "b=1-2"])
    task = load(done.path)
    assert task.specs["b"].shape == (None, 2) and task.train.classes == ("x", "y")
    flat = ["@relation flat", "@attribute f1 numeric", "@attribute f2 numeric", "@attribute colour {red,blue}",
            "@attribute class {p,q}", "@data", *[f"{i},{i * 2},{'red' if i % 3 else 'blue'},{'pq'[i % 2]}"
                                                 for i in range(30)]]  # fmt: skip
    (tmp_path / "flat.arff").write_text("\n".join(flat) + "\n")
    table = load(convert([tmp_path / "flat.arff"], tmp_path / "flat").path)
    assert table.specs["table"].kind == "tabular" and table.specs["table"].columns == ("f1", "f2", "colour")
    assert table.train.classes == ("p", "q")


def test_the_cli_prints_the_commands_to_run_next_and_one_line_errors(tmp_path, capsys):
    raw = arrays_dir(tmp_path)
    assert main(["data", "convert", str(raw), "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert f"modalmoe train generic/token-choice --data {tmp_path / 'd'}" in out
    assert main(["data", "convert", str(raw), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().out
    assert "already holds files" in err and err.count("\n") <= 2
    assert main(["data", "convert", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")]) == 2
    assert "no such file or directory" in capsys.readouterr().out


def test_new_rows_are_coded_with_the_categories_the_run_recorded(tmp_path):
    import warnings

    from modalmoe.data.formats import DataFormatWarning
    from modalmoe.run import RunDir

    def table(path, colours, labelled=True):
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["size", "colour", *(["label"] if labelled else [])])
            for i, c in enumerate(colours):
                w.writerow([i * 0.5, c, *(["ab"[i % 2]] if labelled else [])])

    table(tmp_path / "train.csv", ["blue", "green", "red"] * 20)
    task = load(convert([tmp_path / "train.csv"], tmp_path / "data").path)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_task_info(task)
    specs = run.task_info()["specs"]
    assert specs["table"].categories == {1: ("blue", "green", "red")}  # recorded in task.json
    table(tmp_path / "new.csv", ["red", "purple", "green"], labelled=False)
    new = convert([tmp_path / "new.csv"], tmp_path / "new", unlabelled=True).path
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataFormatWarning)
        rows = load_rows(new, run_specs=specs)
    assert rows.dataset.inputs["table"][:, 1].tolist() == [2.0, 3.0, 1.0]  # red, unseen, green as in training
    with pytest.warns(DataFormatWarning, match="did not record its categories"):
        alone = load_rows(new)
    assert alone.dataset.inputs["table"][:, 1].tolist() == [2.0, 1.0, 0.0]  # its own sorted values: wrong codes
