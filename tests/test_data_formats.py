"""Users' data: the manifest directory format and MultiBench's AV-MNIST and affect layouts.

Every fixture is written here, in the exact layout, into ``tmp_path``: tiny random arrays.
"""

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from modalmoe.data.batch import MultimodalBatch
from modalmoe.data.formats import (
    DataFormatError,
    UntrustedPickleError,
    load,
    load_multibench_affect,
    load_multibench_avmnist,
    save,
)

# ---------------------------------------------------------------------------------------------
# Fixture writers
# ---------------------------------------------------------------------------------------------


def write_manifest(root: Path, manifest: dict) -> None:
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))


def read_manifest(root: Path) -> dict:
    return yaml.safe_load((root / "manifest.yaml").read_text())


def write_npz_task(root: Path, n: int = 30, steps: int = 12) -> dict:
    """Image + variable-length sequence (one file each for all samples) and a split file."""
    rng = np.random.default_rng(0)
    split = rng.permutation(np.array(["train"] * 18 + ["valid"] * 6 + ["test"] * 6))
    train = np.flatnonzero(split == "train")
    label = rng.integers(0, 3, n)
    image = rng.normal(size=(n, 1, 8, 8)).astype(np.float32)
    lengths = rng.integers(2, steps + 1, n)
    lengths[train[0]], lengths[train[2]] = 5, 9
    audio = rng.normal(size=(n, steps, 3)).astype(np.float32)
    audio[np.arange(steps)[None, :] >= lengths[:, None]] = 0  # zero-padded after each length
    present = np.ones(n, dtype=bool)
    present[train[1]] = False  # the file still holds data in that row: the loader must not use it
    audio[train[1], 0, 0] = np.nan  # an absent row may hold anything, NaN included
    np.savez(root / "image.npz", x=image)
    np.savez(root / "audio.npz", x=audio, lengths=lengths, present=present)
    np.savez(root / "splits.npz", split=split, label=label)
    write_manifest(
        root,
        {
            "name": "toy",
            "task": "classification",
            "target": "label",
            "classes": ["a", "b", "c"],
            "modalities": {
                "image": {"kind": "image", "file": "image.npz"},
                "audio": {"kind": "sequence", "file": "audio.npz", "columns": ["f0", "f1", "f2"]},
            },
            "splits": {"file": "splits.npz"},
        },
    )
    return {"split": split, "label": label, "image": image, "audio": audio, "lengths": lengths, "present": present}


def write_parquet_task(root: Path) -> dict:
    """Tabular (numeric + categorical) and text in Parquet; target and split in the tabular file."""
    split = ["train"] * 12 + ["valid"] * 6 + ["test"] * 6
    n = len(split)
    rng = np.random.default_rng(1)
    age = rng.uniform(20, 80, n).tolist()
    age[3] = None  # a null numeric field: sample 3 lacks the clinical modality
    sex = ["F", "M"] * (n // 2)
    sex[4] = None  # a null category: its own code, the sample keeps the modality
    sex[20] = "X"  # seen only in test: the unseen code
    label = ["neg", "pos", "pos"] * (n // 3)
    notes = [f"note {i}" for i in range(n)]
    notes[1] = None  # sample 1 lacks the notes modality
    pq.write_table(
        pa.table({"age": age, "bmi": rng.uniform(18, 30, n), "sex": sex, "label": label, "split": split}),
        root / "clinical.parquet",
    )
    pq.write_table(pa.table({"text": notes}), root / "notes.parquet")
    write_manifest(
        root,
        {
            "name": "clinic",
            "target": "label",
            "classes": ["neg", "pos"],
            "modalities": {
                "clinical": {
                    "kind": "tabular",
                    "file": "clinical.parquet",
                    "columns": ["age", "bmi", "sex"],
                    "categorical": ["sex"],
                },
                "notes": {"kind": "text", "file": "notes.parquet", "column": "text"},
            },
            "splits": {"file": "clinical.parquet", "field": "split"},
        },
    )
    return {"age": age, "sex": sex, "label": label, "notes": notes}


SIZES = {"train": 10, "valid": 4, "test": 5}


def write_per_split_task(root: Path) -> dict:
    """A vector and an NPZ text modality, one file per split, regression targets."""
    rng = np.random.default_rng(2)
    out = {}
    for s, n in SIZES.items():
        feat = rng.normal(size=(n, 5)).astype(np.float32)
        caption = np.array([f"{s} caption {i}" for i in range(n)])
        present = np.ones(n, dtype=bool)
        present[0] = False
        value = rng.normal(size=n)
        meta = np.stack([rng.normal(size=n), np.resize([10.0, 20.0], n)], axis=1)
        if s == "train":
            meta[1, 1] = np.nan  # a missing category
        if s == "test":
            meta[2, 1] = 30.0  # a category never seen in train
        np.savez(root / f"meta_{s}.npz", x=meta)
        np.savez(root / f"feat_{s}.npz", x=feat)
        np.savez(root / f"caption_{s}.npz", x=caption, present=present)
        np.savez(root / f"target_{s}.npz", y=value)
        out[s] = {"feat": feat, "caption": caption, "value": value, "meta": meta}
    write_manifest(
        root,
        {
            "task": "regression",
            "target": "y",
            "modalities": {
                "feat": {"kind": "vector", "file": {s: f"feat_{s}.npz" for s in SIZES}},
                "caption": {"kind": "text", "file": {s: f"caption_{s}.npz" for s in SIZES}},
                "meta": {
                    "kind": "tabular",
                    "file": {s: f"meta_{s}.npz" for s in SIZES},
                    "columns": ["score", "site"],
                    "categorical": ["site"],
                },
            },
            "splits": {"file": {s: f"target_{s}.npz" for s in SIZES}},
        },
    )
    return out


def write_avmnist(root: Path, *, valid: bool, per_class: int = 4) -> dict:
    rng = np.random.default_rng(3)
    sizes = {"train": 10 * per_class, "test": 10} | ({"valid": 10} if valid else {})
    out = {}
    for s, n in sizes.items():
        labels = rng.permutation(np.arange(n) % 10)
        # MultiBench stores images flattened [N, 784]; the valid files here use [N, 28, 28].
        image = rng.integers(0, 256, (n, 784) if s != "valid" else (n, 28, 28)).astype(np.float32)
        audio = rng.integers(0, 256, (n, 112, 112)).astype(np.float32)
        (root / "image").mkdir(exist_ok=True)
        (root / "audio").mkdir(exist_ok=True)
        np.save(root / "image" / f"{s}_data.npy", image)
        np.save(root / "audio" / f"{s}_data.npy", audio)
        np.save(root / f"{s}_labels.npy", labels)
        out[s] = {"image": image, "audio": audio, "labels": labels}
    return out


AFFECT_SIZES = {"train": 8, "valid": 4, "test": 4}
AFFECT_DIMS = {"vision": 5, "audio": 4, "text": 7}


def make_affect(steps: int = 6) -> tuple[dict, dict]:
    """MultiBench's affect dict: front-padded [N, L, D] features and [N, 1, 1] scores."""
    rng = np.random.default_rng(4)
    data, lengths = {}, {}
    for s, n in AFFECT_SIZES.items():
        lengths[s] = rng.integers(1, steps + 1, n)
        split = {}
        for m, d in AFFECT_DIMS.items():
            x = np.zeros((n, steps, d))
            for i, length in enumerate(lengths[s]):
                x[i, steps - length :] = rng.uniform(0.5, 1.5, (length, d))  # data at the end, zeros in front
            split[m] = x
        split["labels"] = rng.uniform(-3, 3, (n, 1, 1))
        split["labels"][0] = 0.0  # a neutral score
        split["id"] = [f"{s}_{i}" for i in range(n)]
        data[s] = split
    data["train"]["text"][1] = 0  # no words: MultiBench drops the sample
    data["train"]["vision"][2] = 0  # no face features: the sample lacks vision
    return data, lengths


def write_pickle(path: Path, obj) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


# ---------------------------------------------------------------------------------------------
# The manifest format
# ---------------------------------------------------------------------------------------------


def test_manifest_npz_loads_splits_lengths_and_present(tmp_path):
    raw = write_npz_task(tmp_path)
    task = load(tmp_path)
    assert task.name == "toy"
    assert {s: len(d) for s, d in task.splits.items()} == {"train": 18, "valid": 6, "test": 6}
    assert task.specs["image"].shape == (1, 8, 8) and task.specs["image"].kind == "image"
    assert task.specs["audio"].shape == (None, 3) and task.specs["audio"].columns == ("f0", "f1", "f2")
    assert task.train.classes == ("a", "b", "c") and task.test.num_classes == 3
    for s in ("train", "valid", "test"):
        rows = raw["split"] == s
        assert torch.equal(task.splits[s].target, torch.as_tensor(raw["label"][rows]))
        assert torch.equal(task.splits[s].inputs["image"], torch.as_tensor(raw["image"][rows]))
        assert torch.equal(task.splits[s].present["audio"], torch.as_tensor(raw["present"][rows]))
        expected = np.where(raw["present"], raw["lengths"], 0)[rows]
        assert torch.equal(task.splits[s].lengths["audio"], torch.as_tensor(expected))
    # The absent sample's row is a placeholder of zeros, although the file held data (and a NaN) there.
    assert np.isnan(raw["audio"][np.flatnonzero(raw["split"] == "train")[1]]).any()
    assert not task.train.inputs["audio"][1].any()


def test_manifest_npz_batches_with_masks_and_present(tmp_path):
    raw = write_npz_task(tmp_path)
    task = load(tmp_path / "manifest.yaml")
    batch = task.train.batch([0, 1, 2])
    assert isinstance(batch, MultimodalBatch)
    assert batch.inputs["image"].shape == (3, 1, 8, 8)
    assert batch.present["audio"].tolist() == [True, False, True]
    assert batch.inputs["audio"].shape == (3, 9, 3)  # padded to the longest present sample (lengths 5, -, 9)
    assert batch.masks["audio"].sum(dim=1).tolist() == [5, 0, 9]
    row = np.flatnonzero(raw["split"] == "train")[2]
    assert torch.equal(batch.inputs["audio"][2], torch.as_tensor(raw["audio"][row, :9]))
    assert batch.target.dtype == torch.long


def test_manifest_parquet_tabular_categories_and_text_nulls(tmp_path):
    raw = write_parquet_task(tmp_path)
    task = load(tmp_path)
    spec = task.specs["clinical"]
    assert spec.kind == "tabular" and spec.shape == (3,) and spec.columns == ("age", "bmi", "sex")
    assert spec.categorical == {2: 3}  # F, M from train, plus one code for unseen or missing
    assert "['F', 'M']" in spec.description
    train = task.train
    assert train.target.tolist() == [["neg", "pos"].index(v) for v in raw["label"][:12]]
    codes = train.inputs["clinical"][:, 2]
    assert codes[0] == 0 and codes[1] == 1  # F, M
    assert codes[4] == 2 and bool(train.present["clinical"][4])  # null category: missing code, modality kept
    assert not train.present["clinical"][3] and not train.inputs["clinical"][3].any()  # null age: absent
    assert train.inputs["clinical"][0, 0] == pytest.approx(raw["age"][0])
    assert task.test.inputs["clinical"][20 - 18, 2] == 2  # "X" never seen in train
    assert train.present["notes"].tolist()[:3] == [True, False, True]
    batch = train.batch([0, 1, 2])
    assert batch.inputs["notes"] == ["note 0", "", "note 2"]
    assert batch.present["notes"].tolist() == [True, False, True]
    assert batch.inputs["clinical"].shape == (3, 3) and batch.inputs["clinical"].dtype == torch.float32


def test_manifest_per_split_files_regression(tmp_path):
    raw = write_per_split_task(tmp_path)
    task = load(tmp_path)
    assert task.name == tmp_path.name  # no name in the manifest: the directory's
    assert {s: len(d) for s, d in task.splits.items()} == SIZES
    assert task.specs["feat"].shape == (5,) and task.specs["caption"].shape == ()
    for s in SIZES:
        data = task.splits[s]
        assert data.task_type == "regression" and data.target.dtype == torch.float32
        assert torch.allclose(data.target, torch.as_tensor(raw[s]["value"], dtype=torch.float32))
        assert torch.equal(data.inputs["feat"], torch.as_tensor(raw[s]["feat"]))
        assert data.inputs["caption"][1] == f"{s} caption 1" and data.inputs["caption"][0] == ""
        assert data.present["caption"].tolist() == [False] + [True] * (SIZES[s] - 1)
    spec = task.specs["meta"]
    assert (
        spec.categorical == {1: 3} and spec.columns == ("score", "site") and "site=['10.0', '20.0']" in spec.description
    )
    assert task.train.inputs["meta"][:3, 1].tolist() == [0, 2, 0]  # 10, NaN (missing), 10
    assert task.test.inputs["meta"][:3, 1].tolist() == [0, 1, 2]  # 10, 20, 30 (unseen)
    assert torch.allclose(task.test.inputs["meta"][:, 0], torch.as_tensor(raw["test"]["meta"][:, 0]).float())
    assert task.train.present["meta"].all()
    batch = task.valid.batch([0, 1, 2])
    assert batch.inputs["meta"].shape == (3, 2)
    assert batch.inputs["feat"].shape == (3, 5) and batch.inputs["caption"] == [
        "",
        "valid caption 1",
        "valid caption 2",
    ]


@pytest.mark.parametrize("writer", [write_npz_task, write_parquet_task, write_per_split_task])
def test_save_then_load_gives_back_the_task(tmp_path, writer):
    (tmp_path / "in").mkdir()
    writer(tmp_path / "in")
    task = load(tmp_path / "in")
    again = load(save(task, tmp_path / "out"))
    assert again.name == task.name and again.specs == task.specs
    for s, data in task.splits.items():
        other = again.splits[s]
        assert torch.equal(other.target, data.target) and other.classes == data.classes
        assert all(torch.equal(other.present[m], data.present[m]) for m in task.modalities)
        assert all(torch.equal(other.lengths[m], data.lengths[m]) for m in data.lengths)
        for m, value in data.inputs.items():
            same = (other.inputs[m] == value) if isinstance(value, list) else torch.equal(other.inputs[m], value)
            assert same, m


# ---------------------------------------------------------------------------------------------
# Bad inputs: each error names the offending file and field
# ---------------------------------------------------------------------------------------------


def edit_manifest(root: Path, change) -> None:
    manifest = read_manifest(root)
    change(manifest)
    write_manifest(root, manifest)


def edit_npz(root: Path, name: str, **changes) -> None:
    with np.load(root / name) as f:
        arrays = dict(f)
    arrays.update(changes)
    np.savez(root / name, **arrays)


def with_non_finite(root: Path) -> None:
    with np.load(root / "image.npz") as f:
        x = f["x"].copy()
    x[0, 0, 0, :2] = np.nan
    x[3, 0, 1, 1] = np.inf
    edit_npz(root, "image.npz", x=x)


def with_long_length(root: Path) -> None:
    with np.load(root / "audio.npz") as f:
        lengths = f["lengths"].copy()
        present = f["present"]
    lengths[np.flatnonzero(present)[0]] = 13
    edit_npz(root, "audio.npz", lengths=lengths)


def with_split(root: Path, replace: str, by: str) -> None:
    with np.load(root / "splits.npz") as f:
        split = f["split"].copy()
    split[split == replace] = by
    edit_npz(root, "splits.npz", split=split)


NPZ_CASES = {
    "missing manifest": (lambda r: (r / "manifest.yaml").unlink(), r"manifest\.yaml: manifest not found"),
    "missing file": (
        lambda r: (r / "image.npz").unlink(),
        r"manifest\.yaml: field 'modalities\.image\.file': file not found: .*image\.npz",
    ),
    "unknown kind": (
        lambda r: edit_manifest(r, lambda m: m["modalities"]["image"].update(kind="picture")),
        r"manifest\.yaml: field 'modalities\.image\.kind': unknown modality kind 'picture'; "
        r"known kinds: image, sequence, tabular, text, vector",
    ),
    "unknown top-level key": (
        lambda r: edit_manifest(r, lambda m: m.update(modalitis=m.pop("modalities"))),
        r"manifest\.yaml: field '\(top level\)': unknown key 'modalitis'; did you mean 'modalities'\?",
    ),
    "unknown modality key": (
        lambda r: edit_manifest(
            r, lambda m: m["modalities"]["audio"].update(fiel=m["modalities"]["audio"].pop("file"))
        ),
        r"manifest\.yaml: field 'modalities\.audio': unknown key 'fiel'; did you mean 'file'\?",
    ),
    "unknown splits key": (
        lambda r: edit_manifest(r, lambda m: m["splits"].update(feild="split")),
        r"manifest\.yaml: field 'splits': unknown key 'feild'; did you mean 'field'\?",
    ),
    "image not NCHW": (
        lambda r: edit_npz(r, "image.npz", x=np.zeros((30, 8, 8), np.float32)),
        r"image\.npz: field 'x': kind 'image' needs \[N, C, H, W\].*got shape \(30, 8, 8\)",
    ),
    "sequence not NLC": (
        lambda r: edit_npz(r, "audio.npz", x=np.zeros((30, 12), np.float32)),
        r"audio\.npz: field 'x': kind 'sequence' needs \[N, L, C\]",
    ),
    "sample count differs": (
        lambda r: edit_npz(r, "image.npz", x=np.zeros((29, 1, 8, 8), np.float32)),
        r"image\.npz: field 'x': 29 samples, but .*splits\.npz field 'label' has 30",
    ),
    "NaN and Inf": (with_non_finite, r"image\.npz: field 'x': 2 NaN and 1 Inf values in 2 samples"),
    "empty split": (
        lambda r: with_split(r, "valid", "train"),
        r"splits\.npz: field 'split': split 'valid' is empty",
    ),
    "unknown split name": (
        lambda r: with_split(r, "train", "trian"),
        r"splits\.npz: field 'split': unknown split names \['trian'\]",
    ),
    "lengths past the padding": (
        with_long_length,
        r"audio\.npz: field 'lengths': 1 lengths are longer than the padded axis L=12",
    ),
    "label outside classes": (
        lambda r: edit_manifest(r, lambda m: m.update(classes=["a", "b"])),
        r"splits\.npz: field 'label': label 2 but only 2 classes are listed",
    ),
    "object array needs pickle": (
        lambda r: edit_npz(r, "splits.npz", split=np.array(["train"] * 30, dtype=object)),
        r"splits\.npz: field 'split': holds Python objects",
    ),
    "missing npz key": (
        lambda r: (
            edit_npz(r, "splits.npz", labels=np.zeros(30, int)) or edit_manifest(r, lambda m: m.update(target="labl"))
        ),
        r"splits\.npz: field 'labl': missing; did you mean 'label'\?",
    ),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_bad_npz_manifest_names_file_and_field(tmp_path, case):
    write_npz_task(tmp_path)
    load(tmp_path)  # the fixture itself is valid
    mutate, message = NPZ_CASES[case]
    mutate(tmp_path)
    with pytest.raises(DataFormatError, match=message):
        load(tmp_path)


def with_parquet_column(root: Path, name: str, values) -> None:
    table = pq.read_table(root / "clinical.parquet")
    table = table.set_column(table.schema.get_field_index(name), name, pa.array(values))
    pq.write_table(table, root / "clinical.parquet")


PARQUET_CASES = {
    "missing column": (
        lambda r: edit_manifest(r, lambda m: m["modalities"]["clinical"]["columns"].append("weight")),
        r"clinical\.parquet: field 'weight': no such column",
    ),
    "string column not declared categorical": (
        lambda r: edit_manifest(r, lambda m: m["modalities"]["clinical"].pop("categorical")),
        r"clinical\.parquet: field 'sex': holds non-numeric values; list the column under 'categorical'",
    ),
    "NaN in a numeric column": (
        lambda r: with_parquet_column(r, "bmi", [float("nan")] + [20.0] * 23),
        r"clinical\.parquet: field 'bmi': 1 NaN and 0 Inf values",
    ),
    "label outside classes": (
        lambda r: with_parquet_column(r, "label", ["maybe"] + ["neg"] * 23),
        r"clinical\.parquet: field 'label': labels \['maybe'\] are not among classes",
    ),
    "categorical on text": (
        lambda r: edit_manifest(r, lambda m: m["modalities"]["notes"].update(categorical=["text"])),
        r"manifest\.yaml: field 'modalities\.notes\.categorical': applies to tabular modalities only",
    ),
    "text row count differs": (
        lambda r: pq.write_table(pa.table({"text": ["a"] * 23}), r / "notes.parquet"),
        r"notes\.parquet: field 'text': 23 samples, but .*clinical\.parquet field 'label' has 24",
    ),
}


@pytest.mark.parametrize("case", list(PARQUET_CASES))
def test_bad_parquet_manifest_names_file_and_field(tmp_path, case):
    write_parquet_task(tmp_path)
    load(tmp_path)
    mutate, message = PARQUET_CASES[case]
    mutate(tmp_path)
    with pytest.raises(DataFormatError, match=message):
        load(tmp_path)


PER_SPLIT_CASES = {
    "split key other than train/valid/test": (
        lambda r: edit_manifest(r, lambda m: m["splits"]["file"].update(validation=m["splits"]["file"].pop("valid"))),
        r"manifest\.yaml: field 'splits\.file': unknown split 'validation'; did you mean 'valid'\?",
    ),
    "empty split file": (
        lambda r: np.savez(r / "target_test.npz", y=np.zeros(0)),
        r"target_test\.npz: field 'y': split 'test' is empty",
    ),
    "layouts mixed": (
        lambda r: edit_manifest(r, lambda m: m["modalities"]["feat"].update(file="feat_train.npz")),
        r"manifest\.yaml: field 'modalities\.feat\.file': 'splits\.file' gives one file per split",
    ),
    "per-sample shapes differ between splits": (
        lambda r: np.savez(r / "feat_test.npz", x=np.zeros((5, 6), np.float32)),
        r"feat_test\.npz: field 'x': per-sample shape \(6,\) differs from \(5,\)",
    ),
}


@pytest.mark.parametrize("case", list(PER_SPLIT_CASES))
def test_bad_per_split_manifest_names_file_and_field(tmp_path, case):
    write_per_split_task(tmp_path)
    load(tmp_path)
    mutate, message = PER_SPLIT_CASES[case]
    mutate(tmp_path)
    with pytest.raises(DataFormatError, match=message):
        load(tmp_path)


# ---------------------------------------------------------------------------------------------
# MultiBench AV-MNIST
# ---------------------------------------------------------------------------------------------


def test_avmnist_without_valid_carves_a_seeded_stratified_split(tmp_path):
    raw = write_avmnist(tmp_path, valid=False)
    task = load_multibench_avmnist(tmp_path, valid_fraction=0.25, seed=0)
    assert {s: len(d) for s, d in task.splits.items()} == {"train": 30, "valid": 10, "test": 10}
    assert torch.bincount(task.valid.target, minlength=10).tolist() == [1] * 10  # one of each digit's four
    assert task.specs["image"].shape == (1, 28, 28) and task.specs["audio"].shape == (1, 112, 112)
    assert task.specs["audio"].kind == "image" and task.train.classes == tuple("0123456789")
    # Train and valid partition the training file: every row once, with its own label and pixels / 255.
    # (the datasets carry no row ids: rows are matched by their first pixels)
    pixels = {tuple(raw["train"]["image"][i, :4]): i for i in range(40)}
    seen = []
    for data in (task.train, task.valid):
        for x, y in zip(data.inputs["image"], data.target, strict=True):
            i = pixels[tuple((x.flatten()[:4] * 255).round().tolist())]
            assert y == raw["train"]["labels"][i]
            assert torch.allclose(x.flatten(), torch.as_tensor(raw["train"]["image"][i] / 255, dtype=torch.float32))
            seen.append(i)
    assert sorted(seen) == list(range(40))
    same = load_multibench_avmnist(tmp_path, valid_fraction=0.25, seed=0)
    other = load_multibench_avmnist(tmp_path, valid_fraction=0.25, seed=1)
    assert torch.equal(same.valid.inputs["image"], task.valid.inputs["image"])
    assert not torch.equal(other.valid.inputs["image"], task.valid.inputs["image"])
    batch = task.train.batch([0, 1, 2])
    assert batch.inputs["image"].shape == (3, 1, 28, 28) and batch.inputs["audio"].shape == (3, 1, 112, 112)
    assert batch.present["audio"].all() and float(batch.inputs["audio"].max()) <= 1.0


def test_avmnist_with_valid_files_uses_them(tmp_path):
    raw = write_avmnist(tmp_path, valid=True)
    task = load_multibench_avmnist(tmp_path)
    assert {s: len(d) for s, d in task.splits.items()} == {"train": 40, "valid": 10, "test": 10}
    assert torch.equal(task.valid.target, torch.as_tensor(raw["valid"]["labels"]))
    expected = torch.as_tensor(raw["valid"]["image"][:, None] / 255, dtype=torch.float32)
    assert torch.allclose(task.valid.inputs["image"], expected)  # [N, 28, 28] files gain a channel axis
    assert torch.allclose(task.test.inputs["audio"][:, 0], torch.as_tensor(raw["test"]["audio"] / 255))


def test_avmnist_errors_name_file_and_field(tmp_path):
    write_avmnist(tmp_path, valid=False)
    np.save(tmp_path / "train_labels.npy", np.zeros(39, dtype=int))
    with pytest.raises(DataFormatError, match=r"image/train_data\.npy: field 'data': 40 samples, but .*train_labels"):
        load_multibench_avmnist(tmp_path)
    np.save(tmp_path / "train_labels.npy", np.zeros(40, dtype=int))
    np.save(tmp_path / "audio" / "train_data.npy", np.zeros((40, 100, 100, 2), np.float32))
    with pytest.raises(DataFormatError, match=r"audio/train_data\.npy: field 'data': expected \[N, 12544\]"):
        load_multibench_avmnist(tmp_path)
    (tmp_path / "audio" / "test_data.npy").unlink()
    np.save(tmp_path / "audio" / "train_data.npy", np.zeros((40, 112, 112), np.float32))
    with pytest.raises(DataFormatError, match=r"audio/test_data\.npy: file not found"):
        load_multibench_avmnist(tmp_path)


# ---------------------------------------------------------------------------------------------
# MultiBench affect pickles
# ---------------------------------------------------------------------------------------------


class _Tripwire:
    """Unpickling this creates a file: proof of whether a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_affect_pickle_is_refused_without_trust_and_never_opened(tmp_path):
    marker = tmp_path / "unpickled"
    path = write_pickle(tmp_path / "mosi.pkl", {"train": _Tripwire(marker)})
    with pytest.raises(UntrustedPickleError, match=r"mosi\.pkl: refusing to unpickle: a pickle file can execute"):
        load_multibench_affect(path)
    with pytest.raises(DataFormatError, match=r"trust=True only for a file from a source you trust.*manifest"):
        load_multibench_affect(path, trust=False)
    assert not marker.exists()
    with pytest.raises(DataFormatError):  # trusted, it runs: the reason for refusing by default
        load_multibench_affect(path, trust=True)
    assert marker.exists()


def test_affect_pickle_with_trust_loads_sequences_lengths_and_labels(tmp_path):
    data, lengths = make_affect()
    path = write_pickle(tmp_path / "mosi_raw.pkl", data)
    task = load_multibench_affect(path, trust=True)
    assert {s: len(d) for s, d in task.splits.items()} == {"train": 7, "valid": 4, "test": 4}  # empty text dropped
    assert "dropped 1 samples with empty text" in task.description
    assert {m: task.specs[m].shape for m in AFFECT_DIMS} == {m: (None, d) for m, d in AFFECT_DIMS.items()}
    assert all(task.specs[m].kind == "sequence" for m in AFFECT_DIMS)
    kept = np.delete(np.arange(8), 1)
    scores = data["train"]["labels"].reshape(-1)[kept]
    assert task.train.classes == ("negative", "positive")
    assert task.train.target.tolist() == (scores > 0).astype(int).tolist()
    assert task.train.target[0] == 0  # a score of exactly 0 is class 0, as MultiBench's get_class
    assert task.train.lengths["text"].tolist() == lengths["train"][kept].tolist()
    assert not task.train.present["vision"][1] and task.train.lengths["vision"][1] == 0  # raw sample 2
    assert task.train.present["audio"].all() and task.train.present["text"].all()
    # The front padding is gone: each sample's steps start at 0, zeros after its length.
    steps = 6
    for j, i in enumerate(kept):
        length = lengths["train"][i]
        expected = torch.as_tensor(data["train"]["text"][i, steps - length :], dtype=torch.float32)
        assert torch.equal(task.train.inputs["text"][j, :length], expected)
        assert not task.train.inputs["text"][j, length:].any()
    batch = task.train.batch([0, 1, 2])
    assert batch.present["vision"].tolist() == [True, False, True]
    assert batch.masks["text"].sum(dim=1).tolist() == lengths["train"][kept[:3]].tolist()
    assert batch.inputs["audio"].shape == (3, int(lengths["train"][kept[:3]].max()), 4)
    regression = load_multibench_affect(path, trust=True, task="regression", drop_empty_text=False)
    assert len(regression.train) == 8 and not regression.train.present["text"][1]
    assert torch.allclose(regression.train.target, torch.as_tensor(data["train"]["labels"].reshape(-1)).float())


def test_affect_aligned_cuts_every_modality_where_the_text_starts(tmp_path):
    data, lengths = make_affect()
    length = lengths["valid"][3]
    data["valid"]["audio"][3, 6 - length] = 0  # the audio's first step inside the text's span is silent
    data["valid"]["vision"][0, : 6 - lengths["valid"][0]] = 1.0  # face features before the first word
    path = write_pickle(tmp_path / "mosi.pkl", data)
    aligned = load_multibench_affect(path, trust=True)
    assert aligned.valid.lengths["audio"][3] == length  # kept: a real, silent step
    assert aligned.valid.lengths["vision"][0] == lengths["valid"][0]  # cut at the text's start
    unaligned = load_multibench_affect(path, trust=True, aligned=False)
    assert unaligned.valid.lengths["audio"][3] == length - 1  # each modality from its own first non-zero step
    assert unaligned.valid.lengths["vision"][0] == 6
    assert unaligned.valid.lengths["text"].tolist() == aligned.valid.lengths["text"].tolist()


def test_affect_non_finite_features_are_an_error_unless_nan_to_num(tmp_path):
    data, _ = make_affect()
    data["valid"]["audio"][2, -1, 0] = -np.inf  # as in MultiBench's MOSEI audio
    data["valid"]["audio"][3, -1, 1] = np.nan
    path = write_pickle(tmp_path / "mosei.pkl", data)
    with pytest.raises(DataFormatError, match=r"mosei\.pkl: field 'valid\.audio': 1 NaN and 1 Inf values.*nan_to_num"):
        load_multibench_affect(path, trust=True)
    task = load_multibench_affect(path, trust=True, nan_to_num=True)
    assert torch.isfinite(task.valid.inputs["audio"]).all()
    assert "valid.audio: replaced 2 NaN/Inf values with 0" in task.description


def test_affect_malformed_pickle_names_split_and_field(tmp_path):
    data, _ = make_affect()
    del data["test"]["text"]
    with pytest.raises(DataFormatError, match=r"field 'test\.text': missing"):
        load_multibench_affect(write_pickle(tmp_path / "a.pkl", data), trust=True)
    data, _ = make_affect()
    data["train"]["labels"] = np.zeros((8, 1, 7))
    with pytest.raises(DataFormatError, match=r"field 'train\.labels': expected one sentiment score per sample"):
        load_multibench_affect(write_pickle(tmp_path / "b.pkl", data), trust=True)
    data, _ = make_affect()
    data["validation"] = data.pop("valid")
    with pytest.raises(DataFormatError, match=r"c\.pkl: .*unknown split 'validation'; did you mean 'valid'\?"):
        load_multibench_affect(write_pickle(tmp_path / "c.pkl", data), trust=True)
