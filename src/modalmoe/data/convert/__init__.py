"""``modalmoe data convert``: the formats people have, as a manifest directory.

    from modalmoe.data.convert import convert
    done = convert(["BasicMotions_TRAIN.ts", "BasicMotions_TEST.ts"], "basic-motions",
                   modality=["accel=0-2", "gyro=3-5"])
    done.path, done.split_sizes, done.modalities

One file per input format, each registered in ``formats`` as ``(detect, convert)``:
``arrays`` (a directory of ``.npy``/``.npz`` files and a labels file), ``table`` (CSV, TSV,
Parquet), ``ts`` and ``arff`` (UEA/UCR multivariate series). A converter returns a ``Draft``
(``base.py``); ``write.py`` assigns the missing splits, writes the directory and loads it back
before it is moved into place. A new format is a new file that registers itself here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from modalmoe.data.convert import arrays, series, tables
from modalmoe.data.convert.base import ConvertError, Draft
from modalmoe.data.convert.write import Converted, write
from modalmoe.registry import Registry


@dataclass(frozen=True)
class Format:
    """An input format: whether paths are in it, and how to read them into a ``Draft``."""

    detect: Callable[[list[Path]], bool]
    read: Callable[..., Draft]
    what: str


formats: Registry[Format] = Registry("data format")
formats.register("arrays")(lambda: Format(arrays.detect, arrays.convert, "a directory of .npy/.npz files"))
formats.register("table")(lambda: Format(tables.detect, tables.convert, ".csv, .tsv or .parquet tables"))
formats.register("ts")(lambda: Format(series.detect_ts, series.convert_ts, "UEA/UCR .ts series"))
formats.register("arff")(lambda: Format(series.detect_arff, series.convert_arff, ".arff files"))


def detect(paths: Sequence[Path]) -> str:
    """The name of the format ``paths`` are in (``ConvertError`` listing the formats when none fits)."""
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise ConvertError(f"{missing[0]}: no such file or directory")
    for name in formats.names():
        if formats.create(name).detect(list(paths)):
            return name
    known = "; ".join(f"{n}: {formats.create(n).what}" for n in formats.names())
    raise ConvertError(
        f"{', '.join(map(str, paths))}: not a format data convert reads ({known}); several files must share one "
        "format (e.g. Task_TRAIN.ts Task_TEST.ts)"
    )


def convert(
    sources: Sequence[str | Path],
    out: str | Path,
    *,
    format: str | None = None,
    name: str | None = None,
    valid: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
    overwrite: bool = False,
    **options,
) -> Converted:
    """Convert ``sources`` into a manifest directory at ``out``.

    Args:
        sources: the input files (several: one per split, named by their file names) or a directory.
        format: one of ``formats`` (default: detected from the paths).
        name: the task's name (default: ``out``'s name).
        valid, test: fractions carved out when the input lacks that split (``write.py``).
        seed: of the carved splits.
        overwrite: replace ``out`` (only with a complete new directory).
        options: the format's options: ``modality`` (``NAME=SPEC`` strings), ``kind``
            (``NAME=KIND``), ``label``, ``labels``, ``splits``, ``split_column``, ``task``,
            ``unlabelled``; one that does not apply to the format is an error.
    """
    paths = [Path(s).expanduser() for s in sources]
    if not paths:
        raise ConvertError("no input: name the files or the directory to convert")
    fmt = formats.create(format or detect(paths))
    paths = [p.resolve() for p in paths]  # the manifest's description names where the data came from
    draft = fmt.read(paths, **options)
    return write(draft, out, name=name, valid=valid, test=test, seed=seed, overwrite=overwrite)


__all__ = ["ConvertError", "Converted", "Draft", "convert", "detect", "formats"]
