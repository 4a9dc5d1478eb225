"""Data input that is damaged, thin or pointing elsewhere fails loudly, naming what to fix (issue 17).

Nothing lost, nothing silently wrong: too few training samples for input statistics, damaged
NPZ and Parquet files, a manifest that is not UTF-8 or not YAML, a ``file:`` outside the data
directory, and labels that only valid or test hold.
"""

import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from modalmoe.cli import main
from modalmoe.data import ModalitySpec, MultimodalDataset, Task
from modalmoe.data.formats import DataFormatError, DataFormatWarning, load, load_multibench_avmnist, save
from modalmoe.encoders import encoders
from modalmoe.encoders.base import Standardize
from test_data_formats import (
    SIZES,
    edit_manifest,
    read_manifest,
    write_avmnist,
    write_npz_task,
    write_parquet_task,
    write_per_split_task,
)

# ---------------------------------------------------------------------------------------------
# 1. Input statistics need at least two training samples
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows",
    [
        torch.tensor([[1.0, 2.0, 3.0]]),  # one row: std is NaN
        torch.zeros(0, 3),  # no row: mean and std are NaN
        torch.tensor([[1.0, float("inf"), 3.0], [2.0, 0.0, 1.0]]),  # a non-finite value
    ],
    ids=["one row", "no row", "inf"],
)
def test_standardize_never_holds_non_finite_statistics(rows):
    standardize = Standardize(3)
    standardize.fit(rows)
    assert torch.isfinite(standardize.mean).all() and torch.isfinite(standardize.std).all()
    assert (standardize.std > 0).all()
    assert torch.isfinite(standardize(torch.randn(4, 3))).all()


def test_standardize_still_standardizes_ordinary_rows():
    x = torch.randn(50, 3) * torch.tensor([1.0, 10.0, 100.0]) + 5
    standardize = Standardize(3)
    standardize.fit(x)
    out = standardize(x)
    assert torch.allclose(out.mean(0), torch.zeros(3), atol=1e-4)
    assert torch.allclose(out.std(0), torch.ones(3), atol=1e-4)


FIT_INPUTS = {
    "vector": (ModalitySpec("heart", "vector", (4,)), torch.randn(6, 4), None),
    "sequence": (
        ModalitySpec("heart", "sequence", (None, 3)),
        torch.randn(6, 5, 3),
        torch.ones(6, 5, dtype=torch.bool),
    ),
    "tabular": (ModalitySpec("heart", "tabular", (3,), categorical={2: 2}), torch.randn(6, 3).abs().round(), None),
}


@pytest.mark.parametrize("kind", list(FIT_INPUTS))
@pytest.mark.parametrize("count", [0, 1])
def test_fitting_a_modality_with_fewer_than_two_training_samples_names_it(kind, count):
    spec, x, mask = FIT_INPUTS[kind]
    encoder = encoders.create(kind, spec=spec, dim=8)
    present = torch.zeros(6, dtype=torch.bool)
    present[:count] = True
    with pytest.raises(DataFormatError, match=rf"modality 'heart': {count} training samples? carr"):
        encoder.fit(x, present, mask)
    present[:2] = True
    encoder.fit(x, present, mask)  # two are enough


def test_cli_train_with_one_training_sample_is_a_usage_error_naming_the_modality(tmp_path, capsys):
    args = ["train", "tiny/token-choice", "--set", "task_options.num_samples=1", "--quiet", "--out", str(tmp_path)]
    assert main(args) == 2
    out = capsys.readouterr().out.replace("\n", " ")  # the console wraps at 80 columns
    assert "modality 'm0'" in out and "at least 2" in out and "learning" not in out


# ---------------------------------------------------------------------------------------------
# 2. Damaged NPZ and Parquet files
# ---------------------------------------------------------------------------------------------


def test_truncated_npz_is_named_as_damaged(tmp_path):
    write_npz_task(tmp_path)
    data = (tmp_path / "audio.npz").read_bytes()
    (tmp_path / "audio.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match=r"audio\.npz: .*damaged.*re-export it") as info:
        load(tmp_path)
    assert "\n" not in str(info.value)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_npz_with_a_bad_crc_is_named_as_damaged_when_its_array_is_read(tmp_path):
    write_npz_task(tmp_path)
    path = tmp_path / "image.npz"
    flip_byte(path, path.stat().st_size // 2)  # inside x's data: the archive opens, the CRC fails on reading
    with np.load(path) as npz:
        assert npz.files == ["x"]
    with pytest.raises(DataFormatError, match=r"image\.npz: field 'x': .*damaged.*\(Bad CRC-32.*re-export it"):
        load(tmp_path)


def test_npz_whose_header_claims_fewer_values_than_it_holds_is_damaged(tmp_path):
    write_per_split_task(tmp_path)
    for s, n in SIZES.items():
        path = tmp_path / f"feat_{s}.npz"
        np.savez(path, x=np.ones((n, 2000), np.float32))
        path.write_bytes(path.read_bytes().replace(f"({n}, 2000)".encode(), f"({n}, 1000)".encode()))
        with np.load(path) as npz:
            assert npz["x"].shape == (n, 1000)  # numpy stops before the end, where zipfile checks the CRC
    with pytest.raises(DataFormatError, match=r"feat_train\.npz: field 'x': the file is damaged.*re-export it"):
        load(tmp_path)


def test_a_npy_file_named_npz_says_how_to_save_it(tmp_path):
    write_npz_task(tmp_path)
    with np.load(tmp_path / "image.npz") as npz:
        x = npz["x"]
    with open(tmp_path / "image.npz", "wb") as f:
        np.save(f, x)
    with pytest.raises(DataFormatError, match=r"image\.npz: .*single \.npy array.*np\.savez"):
        load(tmp_path)


def assert_every_damage_is_a_data_format_error(root: Path, name: str, step: int) -> set[str]:
    """Flip one byte at a time over ``name``: loading either works or raises DataFormatError."""
    path = root / name
    original = path.read_bytes()
    messages = set()
    for offset in range(0, len(original), step):
        flip_byte(path, offset)
        try:
            load(root)
        except DataFormatError as e:
            assert "\n" not in str(e), str(e)
            messages.add(str(e))
        path.write_bytes(original)
    return messages


def test_any_one_byte_damage_of_an_npz_is_a_data_format_error(tmp_path):
    write_per_split_task(tmp_path)
    messages = assert_every_damage_is_a_data_format_error(tmp_path, "feat_train.npz", step=3)
    assert any("damaged" in m and "feat_train.npz" in m for m in messages)


def test_any_one_byte_damage_of_a_parquet_file_is_a_data_format_error(tmp_path):
    write_parquet_task(tmp_path)
    messages = assert_every_damage_is_a_data_format_error(tmp_path, "clinical.parquet", step=7)
    assert any("damaged" in m and "clinical.parquet" in m for m in messages)


def test_truncated_parquet_is_named_as_damaged(tmp_path):
    write_parquet_task(tmp_path)
    data = (tmp_path / "notes.parquet").read_bytes()
    (tmp_path / "notes.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError, match=r"notes\.parquet: .*damaged.*re-export it"):
        load(tmp_path)


def test_parquet_page_checksums_are_verified(tmp_path):
    write_parquet_task(tmp_path)
    table = pq.read_table(tmp_path / "clinical.parquet")
    bmi = table.column("bmi").to_pylist()
    bmi[5] = 12345.678
    table = table.set_column(table.schema.get_field_index("bmi"), "bmi", pa.array(bmi))
    path = tmp_path / "clinical.parquet"
    pq.write_table(table, path, compression="none", write_page_checksum=True)
    offset = path.read_bytes().index(struct.pack("<d", 12345.678))
    flip_byte(path, offset + 3)  # the value changes; only the page checksum can tell
    with pytest.raises(DataFormatError, match=r"clinical\.parquet: .*damaged.*re-export it"):
        load(tmp_path)


# ---------------------------------------------------------------------------------------------
# 3. The manifest's own text
# ---------------------------------------------------------------------------------------------


def test_latin1_manifest_says_to_save_it_as_utf8(tmp_path):
    write_npz_task(tmp_path)
    text = (tmp_path / "manifest.yaml").read_text().replace("name: toy", "name: toy\ndescription: Jörg's data")
    (tmp_path / "manifest.yaml").write_bytes(text.encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"manifest\.yaml: not UTF-8 text .*0xf6.*save it as UTF-8"):
        load(tmp_path)


def test_utf8_manifest_with_a_byte_order_mark_loads(tmp_path):
    write_npz_task(tmp_path)
    text = (tmp_path / "manifest.yaml").read_text()
    (tmp_path / "manifest.yaml").write_bytes(text.encode("utf-8-sig"))
    assert load(tmp_path).name == "toy"


def test_yaml_syntax_error_is_one_line_with_its_position(tmp_path):
    write_npz_task(tmp_path)
    (tmp_path / "manifest.yaml").write_text("name: toy\nmodalities: {image: {kind: image, file: image.npz}\n")
    with pytest.raises(DataFormatError, match=r"manifest\.yaml: not valid YAML: .*line \d+, column \d+") as info:
        load(tmp_path)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# 4. Files outside the manifest's directory
# ---------------------------------------------------------------------------------------------


def outside_task(tmp_path: Path) -> tuple[Path, Path]:
    """A valid task in ``tmp_path/task`` and an empty ``tmp_path/shared`` beside it."""
    root, shared = tmp_path / "task", tmp_path / "shared"
    root.mkdir()
    shared.mkdir()
    write_npz_task(root)
    load(root)
    return root, shared


def point_outside(root: Path, shared: Path, how: str) -> str:
    """Move image.npz to ``shared`` and name it from the manifest by ``how``; the name used."""
    (root / "image.npz").rename(shared / "image.npz")
    if how == "relative":
        name = "../shared/image.npz"
    elif how == "absolute":
        name = str(shared / "image.npz")
    else:
        os.symlink(shared / "image.npz", root / "image.npz")
        name = "image.npz"
    edit_manifest(root, lambda m: m["modalities"]["image"].update(file=name))
    return name


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_a_file_outside_the_manifest_directory_is_refused(tmp_path, how):
    root, shared = outside_task(tmp_path)
    name = point_outside(root, shared, how)
    with pytest.raises(DataFormatError) as info:
        load(root)
    message = str(info.value)
    assert message.startswith(f"{root / 'manifest.yaml'}: field 'modalities.image.file': ")
    assert repr(name) in message and "outside" in message and "data_roots" in message


def test_a_split_file_outside_the_manifest_directory_is_refused(tmp_path):
    root, shared = outside_task(tmp_path)
    (root / "splits.npz").rename(shared / "splits.npz")
    edit_manifest(root, lambda m: m["splits"].update(file="../shared/splits.npz"))
    with pytest.raises(DataFormatError, match=r"field 'splits\.file': .*outside"):
        load(root)


def test_subdirectories_and_symlinks_that_stay_inside_still_load(tmp_path):
    write_npz_task(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "image.npz").rename(tmp_path / "data" / "image.npz")
    os.symlink(tmp_path / "data" / "image.npz", tmp_path / "linked.npz")
    (tmp_path / "audio.npz").rename(tmp_path / "data" / "audio.npz")
    edit_manifest(tmp_path, lambda m: m["modalities"]["image"].update(file="linked.npz"))
    edit_manifest(tmp_path, lambda m: m["modalities"]["audio"].update(file="data/../data/audio.npz"))
    assert load(tmp_path).specs["image"].shape == (1, 8, 8)


def test_a_symlinked_data_directory_still_loads(tmp_path):
    (tmp_path / "real").mkdir()
    write_npz_task(tmp_path / "real")
    os.symlink(tmp_path / "real", tmp_path / "alias")
    assert load(tmp_path / "alias").name == "toy"


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_data_roots_in_the_manifest_allow_a_shared_directory(tmp_path, how):
    root, shared = outside_task(tmp_path)
    point_outside(root, shared, how)
    edit_manifest(root, lambda m: m.update(data_roots=["../shared"]))
    assert load(root).specs["image"].shape == (1, 8, 8)
    edit_manifest(root, lambda m: m.update(data_roots=[str(shared)]))
    assert load(root).specs["image"].shape == (1, 8, 8)


def test_load_data_roots_keyword_allows_a_shared_directory(tmp_path):
    root, shared = outside_task(tmp_path)
    point_outside(root, shared, "relative")
    assert load(root, data_roots=[shared]).specs["image"].shape == (1, 8, 8)
    (tmp_path / "other").mkdir()
    with pytest.raises(DataFormatError, match="outside"):
        load(root, data_roots=[tmp_path / "other"])


@pytest.mark.parametrize(
    "value, message",
    [
        (["../nowhere"], r"field 'data_roots': .*nowhere.* is not a directory"),
        ("../shared", r"field 'data_roots': expected a list of directories"),
        ([""], r"field 'data_roots': expected a list of directories"),
    ],
)
def test_bad_data_roots_name_the_field(tmp_path, value, message):
    root, _ = outside_task(tmp_path)
    edit_manifest(root, lambda m: m.update(data_roots=value))
    with pytest.raises(DataFormatError, match=message):
        load(root)


def test_save_then_load_of_a_task_with_shared_roots_round_trips(tmp_path):
    root, shared = outside_task(tmp_path)
    point_outside(root, shared, "relative")
    edit_manifest(root, lambda m: m.update(data_roots=["../shared"]))
    task = load(root)
    save(task, tmp_path / "copy")
    assert "data_roots" not in read_manifest(tmp_path / "copy")
    assert torch.equal(load(tmp_path / "copy").train.inputs["image"], task.train.inputs["image"])


# ---------------------------------------------------------------------------------------------
# 5. Labels that only valid or test hold
# ---------------------------------------------------------------------------------------------


def set_label(root: Path, values: dict[str, object]) -> None:
    """Replace rows of the npz task's label (``{split: value}``: the first row of that split)."""
    with np.load(root / "splits.npz") as f:
        split, label = f["split"], f["label"].copy()
    label = label.astype(object)
    for s, value in values.items():
        label[np.flatnonzero(split == s)[0]] = value
    np.savez(root / "splits.npz", split=split, label=np.array(label.tolist()))


def string_labels(root: Path) -> None:
    with np.load(root / "splits.npz") as f:
        split, label = f["split"], f["label"]
    np.savez(root / "splits.npz", split=split, label=np.array(["a", "b", "c"])[label])
    edit_manifest(root, lambda m: m.pop("classes"))


def test_a_string_label_only_in_test_is_refused_when_classes_are_inferred(tmp_path):
    write_npz_task(tmp_path)
    string_labels(tmp_path)
    assert load(tmp_path).train.classes == ("a", "b", "c")
    set_label(tmp_path, {"test": "zebra"})
    with pytest.raises(DataFormatError) as info:
        load(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'splits.npz'}: field 'label': labels ['zebra']")
    assert "split 'test'" in message and "train split" in message and "classes" in message


def test_an_integer_label_only_in_valid_is_refused_when_classes_are_inferred(tmp_path):
    write_npz_task(tmp_path)
    edit_manifest(tmp_path, lambda m: m.pop("classes"))
    set_label(tmp_path, {"valid": 7})
    with pytest.raises(DataFormatError, match=r"splits\.npz: field 'label': labels \[7\] occur in split 'valid'"):
        load(tmp_path)


def test_integer_labels_counted_from_one_are_refused(tmp_path):
    write_npz_task(tmp_path)
    edit_manifest(tmp_path, lambda m: m.pop("classes"))
    with np.load(tmp_path / "splits.npz") as f:
        split, label = f["split"], f["label"]
    np.savez(tmp_path / "splits.npz", split=split, label=label + 1)
    with pytest.raises(
        DataFormatError,
        match=r"splits\.npz: field 'label': class indices \[0\] have no sample in any split.*subtract 1",
    ):
        load(tmp_path)


def test_a_declared_class_without_training_sample_is_a_warning_naming_it(tmp_path):
    write_npz_task(tmp_path)
    edit_manifest(tmp_path, lambda m: m.update(classes=["a", "b", "c", "d"]))
    set_label(tmp_path, {"test": 3})
    with pytest.warns(DataFormatWarning, match=r"splits\.npz: field 'label': classes \['d'\] .*no sample in the train"):
        task = load(tmp_path)
    assert task.train.classes == ("a", "b", "c", "d")


def test_declared_classes_all_in_train_give_no_warning(tmp_path):
    write_npz_task(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(tmp_path)


def test_a_parquet_label_only_in_test_is_refused(tmp_path):
    write_parquet_task(tmp_path)
    edit_manifest(tmp_path, lambda m: m.pop("classes"))
    table = pq.read_table(tmp_path / "clinical.parquet")
    label = table.column("label").to_pylist()
    label[-1] = "maybe"
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(label))
    pq.write_table(table, tmp_path / "clinical.parquet")
    with pytest.raises(DataFormatError, match=r"clinical\.parquet: field 'label': labels \['maybe'\] .*'test'"):
        load(tmp_path)


def test_a_saved_task_without_class_names_declares_them_so_that_it_loads_back(tmp_path):
    def split(labels):
        x = np.arange(len(labels) * 2, dtype=np.float32).reshape(len(labels), 2)
        return MultimodalDataset(specs={"v": ModalitySpec("v", "vector", (2,))}, inputs={"v": x}, target=labels)

    # Class 2 has no training sample: inferred classes would refuse it, declared ones warn.
    task = Task("t", {"train": split([0, 1, 0, 1]), "valid": split([0, 1]), "test": split([2, 1])})
    save(task, tmp_path)
    assert read_manifest(tmp_path)["classes"] == ["0", "1", "2"]
    with pytest.warns(DataFormatWarning, match=r"classes \['2'\]"):
        assert load(tmp_path).train.classes == ("0", "1", "2")


def test_avmnist_label_only_in_test_is_refused(tmp_path):
    write_avmnist(tmp_path, valid=True)
    np.save(tmp_path / "test_labels.npy", np.resize([0, 1, 2, 3, 4, 5, 6, 7, 8, 10], 10))
    with pytest.raises(DataFormatError, match=r"test_labels\.npy: field 'labels': labels \[10\] occur in split 'test'"):
        load_multibench_avmnist(tmp_path)


# ---------------------------------------------------------------------------------------------
# The command line: each of these is one line and exit status 2
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "tiny/token-choice", "--set", "train.epochs=1", "--quiet", "--out", str(out)]) == 0
    return out


def damage_truncated(root: Path) -> None:
    data = (root / "feat_train.npz").read_bytes()
    (root / "feat_train.npz").write_bytes(data[:100])


def damage_latin1(root: Path) -> None:
    (root / "manifest.yaml").write_bytes("description: Jörg\n".encode("latin-1"))


@pytest.mark.parametrize("damage", [damage_truncated, damage_latin1], ids=["truncated npz", "latin-1 manifest"])
def test_cli_predict_on_damaged_data_is_a_one_line_usage_error(tiny_run, tmp_path, capsys, damage):
    write_per_split_task(tmp_path)
    damage(tmp_path)
    assert main(["predict", str(tiny_run), "--input", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "error:" in out and str(tmp_path) in out.replace("\n", "")
