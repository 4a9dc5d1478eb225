"""MultiBench's layouts: AV-MNIST's numpy files and the affect pickles (CMU-MOSI/MOSEI style).

Both return a ``Task`` with "train", "valid" and "test" splits; problems raise
``DataFormatError`` naming the file and field. Pickles can run code when loaded, so the
affect loader refuses them unless the caller passes ``trust=True``.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modalmoe.data.batch import TASK_TYPES, ModalitySpec, MultimodalDataset, Task
from modalmoe.data.formats.manifest import (
    SPLITS,
    DataFormatError,
    UntrustedPickleError,
    _check_classes_in_train,
    _check_finite,
    _check_split_names,
    _error,
)

# ---------------------------------------------------------------------------------------------
# MultiBench: AV-MNIST
# ---------------------------------------------------------------------------------------------


def load_multibench_avmnist(
    path: str | Path, *, valid_fraction: float = 5000 / 60000, seed: int = 0, scale: float = 1 / 255
) -> Task:
    """MultiBench's AV-MNIST numpy files: spoken and written digits.

    Layout: ``image/{split}_data.npy`` ([N, 784], [N, 28, 28] or [N, 1, 28, 28]),
    ``audio/{split}_data.npy`` (spectrograms [N, 112, 112]) and ``{split}_labels.npy``
    ([N] digits) for train and test, and for valid if all three valid files exist.

    The audio spectrogram becomes an ``image`` modality ``[N, 1, 112, 112]`` (as MultiBench
    feeds it to a LeNet), not a sequence: its frequency axis is as spatial as its time axis.
    Both modalities are multiplied by ``scale`` (MultiBench divides both by 255).

    Without valid files a validation split is carved out of train: ``valid_fraction`` of it
    (default 5000 of 60000, MultiBench's size), stratified by digit, drawn by scikit-learn's
    ``train_test_split(..., stratify=labels, random_state=seed)``. MultiBench itself takes the
    last 5000 training samples; a seeded stratified draw keeps the class balance on subsets too.

    Args:
        path: the avmnist directory.
        valid_fraction: share of each class moved from train to valid (when there is no valid).
        seed: seed of that draw.
        scale: factor applied to both modalities.

    Returns:
        The task: modalities "image" ``[N, 1, 28, 28]`` and "audio" ``[N, 1, 112, 112]``,
        ten classes "0".."9" (or as many as the labels need; each must occur in train).

    Raises:
        DataFormatError: naming the file and field of a problem, a label that only valid or
            test holds among them.
    """
    root = Path(path)
    files = {s: _avmnist_files(root, s) for s in SPLITS}
    missing = [str(p) for p in files["valid"] if not p.is_file()]
    on_disk = SPLITS if not missing else ("train", "test")
    if missing and len(missing) < 3:
        raise DataFormatError(f"{missing[0]}: file not found (the other valid files exist; give all three or none)")
    raw = {s: _avmnist_split(*files[s], scale) for s in on_disk}
    if "valid" not in raw:
        train_idx, valid_idx = _stratified_split(raw["train"][2], valid_fraction, seed, files["train"][2])
        full = raw["train"]
        raw["train"] = tuple(a[train_idx] for a in full)
        raw["valid"] = tuple(a[valid_idx] for a in full)
    num_classes = max(int(raw[s][2].max()) for s in SPLITS) + 1
    classes = [str(i) for i in range(num_classes)]
    label_files = {s: files[s if s in on_disk else "train"][2] for s in SPLITS}  # a carved valid is from train
    # Inferred from the labels, so a digit that only valid or test holds would be a class never trained.
    _check_classes_in_train(
        {s: raw[s][2] for s in SPLITS}, classes, label_files, "labels", declared=False, names=False, declare=""
    )
    specs = {
        "image": ModalitySpec("image", "image", raw["train"][0].shape[1:], description="written digit, grey image"),
        "audio": ModalitySpec("audio", "image", raw["train"][1].shape[1:], description="spoken digit, spectrogram"),
    }
    splits = {
        s: MultimodalDataset(
            specs=specs,
            inputs={"image": raw[s][0], "audio": raw[s][1]},
            target=raw[s][2],
            classes=classes,
        )
        for s in SPLITS
    }
    carved = (
        "valid from files" if not missing else f"valid: seeded stratified {valid_fraction:.4f} of train (seed {seed})"
    )
    return Task("avmnist", splits, f"MultiBench AV-MNIST from {root}; {carved}; pixels times {scale:g}")


def _avmnist_files(root: Path, split: str) -> tuple[Path, Path, Path]:
    return root / "image" / f"{split}_data.npy", root / "audio" / f"{split}_data.npy", root / f"{split}_labels.npy"


def _avmnist_split(image: Path, audio: Path, labels: Path, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x_image = _as_grey_image(_load_npy(image), image, 28)
    x_audio = _as_grey_image(_load_npy(audio), audio, 112)
    y = _load_npy(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.dtype.kind not in "biuf":
        raise _error(labels, "labels", f"expected [N] digit labels, got dtype {y.dtype} and shape {y.shape}")
    _check_finite(y, labels, "labels")
    for file, x in ((image, x_image), (audio, x_audio)):
        if len(x) != len(y):
            raise _error(file, "data", f"{len(x)} samples, but {labels} has {len(y)} labels")
        _check_finite(x, file, "data")
        x *= scale
    if (y < 0).any() or (y != np.round(y)).any():
        raise _error(labels, "labels", "digit labels must be whole numbers >= 0")
    return x_image, x_audio, y.astype(np.int64)


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        # Memory-mapped so that only the float32 copy made below is held in memory.
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise DataFormatError(f"{path}: not a plain numeric .npy array (object arrays need pickle): {e}") from e


def _as_grey_image(x: np.ndarray, path: Path, side: int) -> np.ndarray:
    """``[N, side*side]``, ``[N, H, W]`` or ``[N, 1, H, W]`` -> float32 ``[N, 1, H, W]`` (a new array)."""
    if x.dtype.kind not in "biuf":
        raise _error(path, "data", f"expected numbers, got dtype {x.dtype}")
    if x.ndim == 2 and x.shape[1] == side * side:
        x = x.reshape(len(x), side, side)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise _error(path, "data", f"expected [N, {side * side}], [N, H, W] or [N, 1, H, W], got shape {x.shape}")
    return np.array(x, dtype=np.float32)


def _stratified_split(labels: np.ndarray, fraction: float, seed: int, file: Path) -> tuple[np.ndarray, np.ndarray]:
    """Train and valid row indices (sorted), each with the class proportions of ``labels``."""
    from sklearn.model_selection import train_test_split  # imported when needed: a slow import

    if not 0 < fraction < 1:
        raise ValueError(f"valid_fraction must be in (0, 1), got {fraction}")
    try:
        train, valid = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as e:  # fewer samples than classes, or a class with one sample
        raise _error(file, "labels", f"cannot carve a stratified {fraction:.3f} validation split: {e}") from e
    train, valid = np.sort(train), np.sort(valid)
    if len(valid) == 0 or len(train) == 0:
        raise _error(
            file, "labels", f"{len(labels)} training samples are too few to carve a {fraction:.3f} validation split"
        )
    return train, valid


# ---------------------------------------------------------------------------------------------
# MultiBench: affect (CMU-MOSI, CMU-MOSEI)
# ---------------------------------------------------------------------------------------------

_AFFECT_FIELDS = ("vision", "audio", "text")


def load_multibench_affect(
    path: str | Path,
    *,
    trust: bool = False,
    task: str = "classification",
    aligned: bool = True,
    drop_empty_text: bool = True,
    nan_to_num: bool = False,
) -> Task:
    """MultiBench's affect pickle (CMU-MOSI, CMU-MOSEI): ``{split: {vision, audio, text, labels}}``.

    Each of vision ``[N, L, Dv]``, audio ``[N, L, Da]`` and text ``[N, L, Dt]`` becomes a
    ``sequence`` modality. MultiBench pads at the *front* with zero steps (the data sits at
    the end); its loader starts each sample at the first step where the text is non-zero
    (``aligned``, the default) or, unaligned, where each modality is non-zero. We do the
    same, move the kept steps to the front and record their count in ``lengths``. A modality
    with nothing but zeros in a sample's kept steps is absent from that sample (``present``).

    Samples whose text is all zeros are dropped when ``drop_empty_text`` (MultiBench's
    ``drop_entry`` does so, testing ``text.sum() == 0``); otherwise they keep their text absent.

    Labels are sentiment scores in [-3, 3]. Classification: ``1`` ("positive") when the score
    is ``> 0``, else ``0`` ("negative"), MultiBench's ``get_class``; a score of exactly 0 is
    class 0, and MultiBench's non-zero accuracy leaves such samples out when it evaluates.
    Regression: the raw score.

    Args:
        path: the pickle file.
        trust: unpickle the file. Pickle runs arbitrary code while loading, so pass True only
            for a file from a source you trust.
        task: "classification" or "regression".
        aligned: cut every modality where the text starts (MultiBench's default), or each
            where it starts itself.
        drop_empty_text: drop samples with all-zero text, as MultiBench does.
        nan_to_num: replace NaN and +-Inf features with 0 (MultiBench's MOSEI audio holds
            -Inf, which its loader sets to 0); without it they are an error.

    Returns:
        The task: modalities "vision", "audio", "text"; classes ("negative", "positive") for
        classification.

    Raises:
        UntrustedPickleError: without ``trust``; the file is not opened.
        DataFormatError: naming the split and field of a malformed or non-finite array.
    """
    path = Path(path)
    if task not in TASK_TYPES:
        raise ValueError(f"unknown task {task!r}; choose one of {TASK_TYPES}")
    if not trust:
        raise UntrustedPickleError(
            f"{path}: refusing to unpickle: a pickle file can execute arbitrary code when it is loaded. Pass "
            "trust=True only for a file from a source you trust, then convert it once to the manifest format "
            "(modalmoe.data.formats.save(task, directory)), which loads without pickle."
        )
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    with open(path, "rb") as f:
        data = pickle.load(f)  # the caller vouched for the file (trust=True)
    if not isinstance(data, Mapping):
        raise DataFormatError(f"{path}: expected a dict {{'train': ..., 'valid': ..., 'test': ...}}, got {type(data)}")
    _check_split_names(list(data), path, "(top level)")
    notes: list[str] = []
    splits = {s: _affect_split(data[s], path, s, task, aligned, drop_empty_text, nan_to_num, notes) for s in SPLITS}
    description = f"MultiBench affect data from {path.name}; {'aligned' if aligned else 'unaligned'} starts"
    return Task(path.stem, splits, "; ".join([description, *notes]))


def _affect_split(
    split: Any, path: Path, name: str, task: str, aligned: bool, drop_empty: bool, nan_to_num: bool, notes: list[str]
) -> MultimodalDataset:
    if not isinstance(split, Mapping):
        raise _error(path, name, f"expected a dict with {', '.join(_AFFECT_FIELDS)} and labels, got {type(split)}")
    arrays = {m: _affect_array(split, path, name, m, nan_to_num, notes) for m in _AFFECT_FIELDS}
    scores = _affect_labels(split, path, name)
    n = len(scores)
    for m, x in arrays.items():
        if len(x) != n:
            raise _error(path, f"{name}.{m}", f"{len(x)} samples, but '{name}.labels' has {n}")
    steps = {m: x.shape[1] for m, x in arrays.items()}
    if aligned and len(set(steps.values())) > 1:
        raise _error(path, name, f"aligned starts need one sequence length, got {steps}; pass aligned=False")
    starts = {m: _first_nonzero(x) for m, x in arrays.items()}
    keep = np.arange(n)
    if drop_empty:
        keep = np.flatnonzero(starts["text"] < steps["text"])
        if len(keep) < n:
            notes.append(f"{name}: dropped {n - len(keep)} samples with empty text")
    inputs, present, lengths = {}, {}, {}
    for m, x in arrays.items():
        start = starts[m][keep]
        if aligned:
            text_start = starts["text"][keep]
            start = np.where(text_start < steps["text"], text_start, start)
        inputs[m], lengths[m] = _left_align(x[keep], start)
        present[m] = (inputs[m] != 0).any(axis=(1, 2))
        lengths[m] = np.where(present[m], lengths[m], 0)
    scores = scores[keep]
    if task == "classification":
        target, classes = (scores > 0).astype(np.int64), ("negative", "positive")
    else:
        target, classes = scores.astype(np.float32), None
    specs = {m: ModalitySpec(m, "sequence", (None, arrays[m].shape[2]), description=f"{m} features") for m in arrays}
    return MultimodalDataset(
        specs=specs, inputs=inputs, target=target, present=present, lengths=lengths, classes=classes, task_type=task
    )


def _affect_array(split: Mapping, path: Path, name: str, field: str, nan_to_num: bool, notes: list[str]) -> np.ndarray:
    if field not in split:
        raise _error(path, f"{name}.{field}", f"missing (the split holds {', '.join(map(str, split))})")
    x = np.asarray(split[field])
    if x.ndim != 3 or x.dtype.kind not in "biuf":
        raise _error(path, f"{name}.{field}", f"expected numbers [N, L, D], got dtype {x.dtype} and shape {x.shape}")
    x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any() and nan_to_num:
        x[bad] = 0
        notes.append(f"{name}.{field}: replaced {int(bad.sum())} NaN/Inf values with 0")
    _check_finite(x, path, f"{name}.{field}", "pass nan_to_num=True to replace them with 0 (no silent cleaning)")
    return x


def _affect_labels(split: Mapping, path: Path, name: str) -> np.ndarray:
    if "labels" not in split:
        raise _error(path, f"{name}.labels", "missing")
    y = np.asarray(split["labels"])
    if y.dtype.kind not in "biuf" or y.ndim == 0 or int(np.prod(y.shape[1:])) != 1:
        raise _error(path, f"{name}.labels", f"expected one sentiment score per sample, got shape {y.shape}")
    y = y.reshape(len(y)).astype(np.float64)
    _check_finite(y, path, f"{name}.labels")
    return y


def _first_nonzero(x: np.ndarray) -> np.ndarray:
    """``[N]`` index of the first step with any non-zero feature; ``L`` when there is none."""
    nonzero = (x != 0).any(axis=2)
    return np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), x.shape[1])


def _left_align(x: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Steps ``start:`` of each sample moved to the front, zeros after: ``([N, L, D], lengths [N])``."""
    steps = x.shape[1]
    source = np.arange(steps)[None, :] + start[:, None]
    out = np.take_along_axis(x, np.minimum(source, steps - 1)[:, :, None], axis=1)
    out[source >= steps] = 0
    return out, steps - start
