"""Atomic file writes (a reader sees the old file or the complete new one, never a half), and
the reader of append-only JSON-lines logs.

Used by the data cache, checkpoints and result files. The content goes to a temporary
file in the same directory (same filesystem, so the rename is atomic), is flushed and
fsynced, then renamed over the target. On any error the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path


class DamagedFile(ValueError):
    """A file modalmoe wrote that can no longer be read as written; the message names it."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    Example:
        >>> with atomic_path("out.npz") as tmp, open(tmp, "wb") as f:
        ...     np.savez(f, x=x)  # a file object: given a path, numpy would append ".npz"
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix + ".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """The records of an append-only JSON-lines log, each with its line of text.

    A process killed in the middle of an append leaves a torn last line: it is dropped with
    a warning (it was never a complete record). A damaged line before the last cannot come
    from a kill, so it is refused.

    Raises:
        DamagedFile: naming the file and line of a damaged record that is not the last.
    """
    path = Path(path)
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as err:
            if number == len(lines):
                warnings.warn(f"{path}:{number}: dropped a torn last line (a write was interrupted)", stacklevel=2)
                continue
            raise DamagedFile(
                f"{path}:{number} is not a JSON record ({err}); the file is damaged: delete that line, "
                "or start the run over"
            ) from None
        out.append((line, record))
    return out
