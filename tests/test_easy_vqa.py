"""easy-vqa and folder sources, on a tiny fake wheel (default tier: no download) and on the
real wheel (slow tier: fetched from PyPI, or from $MODALMOE_WHEELHOUSE)."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modalmoe.data import describe as describe_module
from modalmoe.data import load_task
from modalmoe.data.describe import linear_baselines, summary
from modalmoe.data.sources import (
    FetchError,
    fetch,
    file_path,
    folder_sha256,
    is_cached,
    listing_sha256,
    wheel_folder_sha256,
)
from modalmoe.data.tasks.easy_vqa import EasyVQA

ANSWERS = ["circle", "red", "yes", "blue", "no"]  # not sorted: the classes keep this order
TRAIN_IMAGES, TEST_IMAGES = 10, 3


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _questions(count: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    rows = []
    for image in range(count):
        for j in range(int(rng.integers(1, 4))):
            rows.append([f"question {j} about image {image}?", ANSWERS[int(rng.integers(len(ANSWERS)))], image])
    return rows


@pytest.fixture
def fake(tmp_path: Path):
    """(wheelhouse, task pinned to a fake easy_vqa-1.0 wheel, the wheel's files by name)."""
    house = tmp_path / "wheelhouse"
    house.mkdir()
    files = {"easy_vqa/__init__.py": b"", "easy_vqa/data/answers.txt": ("\n".join(ANSWERS) + "\n").encode()}
    for split, count, seed in (("train", TRAIN_IMAGES, 0), ("test", TEST_IMAGES, 100)):
        for i in range(count):
            files[f"easy_vqa/data/{split}/images/{i}.png"] = _png(seed + i)
        files[f"easy_vqa/data/{split}/questions.json"] = json.dumps(_questions(count, seed)).encode()
    wheel = house / EasyVQA.sources["answers"].wheel
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("easy_vqa/data/train/", b"")  # a directory entry: not a file of the folder
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("easy_vqa-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: easy-vqa\nVersion: 1.0\n")
    task = EasyVQA()
    task.sources = {
        key: replace(
            source,
            wheel_sha256=_sha(wheel.read_bytes()),
            sha256=wheel_folder_sha256(wheel, source.path) if source.is_folder else _sha(files[source.path]),
        )
        for key, source in EasyVQA.sources.items()
    }
    return house, task, files


def _stray(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.name.endswith((".tmp", ".old"))]


def test_listing_hash_is_the_documented_canonical_listing(fake):
    house, task, files = fake
    folder = "easy_vqa/data/train/images/"
    names = sorted(n[len(folder) :] for n in files if n.startswith(folder))
    listing = "".join(f"{n}\0{_sha(files[folder + n])}\n" for n in names).encode()
    assert task.sources["train_images"].sha256 == _sha(listing)
    assert listing_sha256([("b", "2"), ("a", "1")]) == _sha(b"a\x001\nb\x002\n")


def test_folder_source_extracts_verifies_and_reextracts_what_changed(tmp_path, fake):
    house, task, files = fake
    cache, source = tmp_path / "cache", task.sources["train_images"]
    assert not is_cached(source, cache)
    folder = fetch(source, cache=cache, wheelhouse=house)
    assert folder == file_path(source, cache) and folder.is_dir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{i}.png" for i in range(TRAIN_IMAGES))
    assert (folder / "3.png").read_bytes() == files["easy_vqa/data/train/images/3.png"]
    assert is_cached(source, cache) and folder_sha256(folder) == source.sha256
    (house / source.wheel).unlink()  # from now on only the cached, verified wheel
    (folder / "3.png").write_bytes(b"tampered")
    (folder / "extra.png").write_bytes(b"stray")
    (folder / "5.png").unlink()
    assert not is_cached(source, cache)
    again = fetch(source, cache=cache, wheelhouse=house)
    assert again == folder and folder_sha256(folder) == source.sha256
    assert (folder / "3.png").read_bytes() == files["easy_vqa/data/train/images/3.png"]
    assert not (folder / "extra.png").exists() and (folder / "5.png").is_file()
    assert _stray(cache) == []
    single = task.sources["answers"]  # single-file sources of the same wheel are as before
    assert fetch(single, cache=cache).read_bytes() == files[single.path]


def test_folder_listing_mismatch_fails_and_leaves_nothing(tmp_path, fake):
    house, task, _ = fake
    cache, bad = tmp_path / "cache", replace(task.sources["test_images"], sha256="0" * 64)
    with pytest.raises(FetchError, match="listing sha256 .* does not match the pinned") as err:
        fetch(bad, cache=cache, wheelhouse=house)
    assert "Nothing was written" in str(err.value)
    assert not file_path(bad, cache).exists() and _stray(cache) == []
    assert not list(file_path(bad, cache).parent.iterdir())
    with pytest.raises(FetchError, match="no files under"):
        fetch(replace(bad, path="easy_vqa/data/nothing/"), cache=cache, wheelhouse=house)


def test_a_mismatching_refetch_removes_the_changed_folder(tmp_path, fake):
    house, task, _ = fake
    cache, source = tmp_path / "cache", task.sources["test_images"]
    folder = fetch(source, cache=cache, wheelhouse=house)
    (folder / "0.png").write_bytes(b"changed")
    with pytest.raises(FetchError):
        fetch(replace(source, sha256="1" * 64), cache=cache, wheelhouse=house)
    assert not folder.exists() and _stray(cache) == []


def test_splits_classes_shapes_and_values(tmp_path, fake):
    house, task, files = fake
    loaded = task.load(cache=tmp_path / "cache", wheelhouse=house)
    assert set(loaded.splits) == {"train", "valid", "test"}
    assert loaded.train.classes == tuple(ANSWERS)
    assert loaded.specs["image"].kind == "image" and loaded.specs["image"].shape == (3, 64, 64)
    assert loaded.specs["question"].kind == "text"
    images = {split: set(data.groups.tolist()) for split, data in loaded.splits.items()}
    assert not images["train"] & images["valid"] and not images["train"] & images["test"]
    assert not images["valid"] & images["test"]
    assert len(images["valid"]) == 1 and images["train"] | images["valid"] == set(range(TRAIN_IMAGES))
    assert images["test"] == {TRAIN_IMAGES + i for i in range(TEST_IMAGES)}
    raw = {split: json.loads(files[f"easy_vqa/data/{split}/questions.json"]) for split in ("train", "test")}
    assert len(loaded.train) + len(loaded.valid) == len(raw["train"]) and len(loaded.test) == len(raw["test"])
    for split, data in loaded.splits.items():
        x = data.inputs["image"]
        assert x.dtype == torch.float32 and x.shape == (len(data), 3, 64, 64)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        source = "test" if split == "test" else "train"
        for i in (0, len(data) - 1):
            image = int(data.groups[i]) - (TRAIN_IMAGES if split == "test" else 0)
            png = np.asarray(Image.open(io.BytesIO(files[f"easy_vqa/data/{source}/images/{image}.png"])))
            assert torch.equal(x[i], torch.from_numpy(png.transpose(2, 0, 1).copy()).float() / 255)
            question, answer = data.inputs["question"][i], data.classes[int(data.target[i])]
            assert [question, answer, image] in raw[source]
    batch = loaded.test.batch(range(2))
    assert batch.inputs["image"].shape == (2, 3, 64, 64) and len(batch.inputs["question"]) == 2


def test_uint8_cache_round_trips_and_a_damaged_one_is_rebuilt(tmp_path, fake, monkeypatch, caplog):
    house, task, _ = fake
    cache = tmp_path / "cache"
    built = task.load(cache=cache, wheelhouse=house)
    path = task.cache_path(cache)
    with np.load(path, allow_pickle=False) as npz:
        assert npz["images"].dtype == np.uint8 and npz["images"].shape == (TRAIN_IMAGES + TEST_IMAGES, 3, 64, 64)
        assert not any(key.endswith("inputs/image") for key in npz.files)
    monkeypatch.setattr(task, "parse", lambda files: pytest.fail("the second load must read the cache"))
    again = task.load(cache=cache, wheelhouse=house)
    for split, data in built.splits.items():
        assert torch.equal(data.inputs["image"], again.splits[split].inputs["image"])
        assert data.inputs["question"] == again.splits[split].inputs["question"]
        assert torch.equal(data.target, again.splits[split].target)
        assert torch.equal(data.groups, again.splits[split].groups)
    assert again.description == task.description
    monkeypatch.undo()
    path.write_bytes(path.read_bytes()[:1000])  # truncated by a full disk, say
    with caplog.at_level("WARNING"):
        rebuilt = task.load(cache=cache, wheelhouse=house)
    assert "rebuilding easy-vqa" in caplog.text
    assert torch.equal(rebuilt.train.inputs["image"], built.train.inputs["image"])


def test_describe_reports_the_prior_and_samples_wide_features(tmp_path, fake, monkeypatch, caplog):
    house, task, _ = fake
    loaded = task.load(cache=tmp_path / "cache", wheelhouse=house)
    info = summary(loaded)
    majority = int(torch.bincount(loaded.train.target, minlength=len(ANSWERS)).argmax())
    assert info["majority"]["class"] == ANSWERS[majority]
    assert info["majority"]["test"] == round(float((loaded.test.target == majority).float().mean()), 4)
    monkeypatch.setattr(describe_module, "MAX_DENSE_VALUES", 4 * 769)  # 4 rows of 16x16x3 pooled pixels
    with caplog.at_level("WARNING"):
        sampled = linear_baselines(loaded)
    assert sampled["image"]["train_rows"] == 4 and sampled["all"]["train_rows"] == 4
    assert set(sampled) == {"image", "question", "all"} and "train_rows" not in sampled["question"]
    assert all(0 <= s[split] <= 1 for s in sampled.values() for split in ("valid", "test"))
    assert "seeded sample of 4" in caplog.text


# The real wheel -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real():
    return load_task("easy-vqa")


@pytest.mark.slow
def test_real_counts_splits_and_prior(real):
    assert len(real.train.classes) == 13 and real.train.classes[:2] == ("circle", "green")
    assert len(real.train) + len(real.valid) == 38_575 and len(real.test) == 9_673
    assert {k: len(v) for k, v in real.splits.items()} == {"train": 34_680, "valid": 3_895, "test": 9_673}
    images = {split: set(data.groups.tolist()) for split, data in real.splits.items()}
    assert [len(images[s]) for s in ("train", "valid", "test")] == [3_600, 400, 1_000]
    assert not images["train"] & images["valid"] and not (images["train"] | images["valid"]) & images["test"]
    yes_no = [real.train.classes.index("yes"), real.train.classes.index("no")]
    train_yes_no = sum(int(torch.isin(real.splits[s].target, torch.tensor(yes_no)).sum()) for s in ("train", "valid"))
    assert train_yes_no == 28_407
    assert int(torch.isin(real.test.target, torch.tensor(yes_no)).sum()) == 7_136
    x = real.test.inputs["image"]
    assert x.shape == (9_673, 3, 64, 64) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1


@pytest.mark.slow
def test_real_folder_sources_match_their_pins(real):
    task = EasyVQA()
    for source in task.sources.values():
        assert is_cached(source), source
        if source.is_folder:
            assert len(list(fetch(source).glob("*.png"))) == (4_000 if "/train/" in source.path else 1_000)
