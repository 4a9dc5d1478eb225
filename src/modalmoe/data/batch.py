"""The batch contract and the in-memory dataset every task and format produces.

``MultimodalBatch`` is what flows from ``data/`` to the encoders. An absent modality is a
fact recorded in ``present``; the rows of ``inputs`` for samples without it are
placeholders that carry no data (zeros, or an empty string for text), and every consumer
must read ``present``. A modality absent from every sample of a batch is left out of
``inputs`` altogether, so code that forgets ``present`` fails loudly instead of learning
from zeros.

Kinds of modality (``ModalitySpec.kind``), with the tensor each one carries per sample:

- ``image``: float ``[C, H, W]``;
- ``sequence``: float ``[L, C]`` with a variable length ``L`` (audio frames, sensor
  series); batches are padded to the longest sample and carry ``masks[name]`` ``[B, L]``;
- ``tabular``: float ``[F]``; columns listed in ``spec.categorical`` hold integer codes
  ``0..cardinality-1``, the others are numeric;
- ``text``: a ``str`` (a batch carries ``list[str]``; the text encoders tokenize);
- ``vector``: float ``[F]`` pre-extracted features.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

KINDS = ("image", "sequence", "tabular", "text", "vector")
TASK_TYPES = ("classification", "regression")


@dataclass(frozen=True)
class ModalitySpec:
    """What one modality is.

    Attributes:
        name: the key in ``inputs``.
        kind: one of ``KINDS``.
        shape: per-sample shape; ``None`` marks the variable axis of a sequence (``(None, 13)``);
            ``()`` for text.
        categorical: tabular only: column index -> number of categories.
        columns: optional column or channel names (tabular fields, sensor axes).
        description: one line for ``modalmoe data describe``.
        categories: tabular only: column index -> the values its codes ``0..K-1`` stand for, when
            the codes were made from the values (a run records them, so new rows are coded as in
            training).
    """

    name: str
    kind: str
    shape: tuple[int | None, ...]
    categorical: Mapping[int, int] = field(default_factory=dict)
    columns: tuple[str, ...] = ()
    description: str = ""
    categories: Mapping[int, tuple] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"modality {self.name!r}: unknown kind {self.kind!r}; choose one of {KINDS}")
        object.__setattr__(self, "shape", tuple(self.shape))
        object.__setattr__(self, "categorical", {int(k): int(v) for k, v in dict(self.categorical).items()})
        object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "categories", {int(k): tuple(v) for k, v in dict(self.categories).items()})

    @property
    def variable_length(self) -> bool:
        return self.kind == "sequence"


@dataclass
class MultimodalBatch:
    """A batch of ``B`` samples.

    Attributes:
        inputs: modality -> ``[B, ...]`` tensor (``list[str]`` for text); a modality that no
            sample of the batch carries is absent from this dict.
        present: modality -> bool ``[B]``: which samples carry it (every modality of the task).
        target: ``[B]`` class index (long) or value (float).
        masks: sequence modality -> bool ``[B, L]``, True for real time steps.
        meta: anything else per batch (e.g. ``{"index": [B] dataset rows}``).
    """

    inputs: dict[str, Tensor | list[str]]
    present: dict[str, Tensor]
    target: Tensor
    masks: dict[str, Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.target.shape[0])

    @property
    def modalities(self) -> list[str]:
        """Modalities of the task (present in at least one sample or not)."""
        return list(self.present)

    def to(self, device: torch.device | str) -> MultimodalBatch:
        """The batch on ``device`` (text stays a list of strings)."""

        def move(v):
            return v.to(device) if isinstance(v, Tensor) else v

        return replace(
            self,
            inputs={k: move(v) for k, v in self.inputs.items()},
            present={k: move(v) for k, v in self.present.items()},
            target=move(self.target),
            masks={k: move(v) for k, v in self.masks.items()},
            meta={k: move(v) for k, v in self.meta.items()},
        )


def collate(samples: Sequence[Mapping], specs: Mapping[str, ModalitySpec] | None = None) -> MultimodalBatch:
    """Stack per-sample dicts into a ``MultimodalBatch`` (for ``torch.utils.data.DataLoader``).

    Args:
        samples: dicts ``{"inputs": {name: array | str | None}, "target": y}``; a missing key
            or ``None`` means the sample lacks that modality. Optional ``"present"`` dict.
        specs: the task's modalities (default: every name seen in the samples, kinds guessed:
            ``str`` -> text, 2-D arrays -> sequence, others -> vector). Pass ``specs`` when a
            modality may be missing from a whole batch, so ``present`` still lists it.

    Returns:
        The batch; sequences padded to the longest sample, with ``masks``.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    if specs is None:
        specs = {}
        for s in samples:
            for name, v in s["inputs"].items():
                if v is not None and name not in specs:
                    specs[name] = _guess_spec(name, v)
    inputs, present, masks = {}, {}, {}
    for name, spec in specs.items():
        values = [s["inputs"].get(name) for s in samples]
        flags = [
            v is not None and bool(s.get("present", {}).get(name, True)) for s, v in zip(samples, values, strict=True)
        ]
        present[name] = torch.tensor(flags, dtype=torch.bool)
        if not any(flags):
            continue
        if spec.kind == "text":
            inputs[name] = [str(v) if f else "" for v, f in zip(values, flags, strict=True)]
            continue
        arrays = [
            torch.as_tensor(np.asarray(v), dtype=torch.float32) if f else None
            for v, f in zip(values, flags, strict=True)
        ]
        example = next(a for a in arrays if a is not None)
        if spec.variable_length:
            lengths = torch.tensor([a.shape[0] if a is not None else 0 for a in arrays])
            out = example.new_zeros(len(arrays), int(lengths.max()), *example.shape[1:])
            for i, a in enumerate(arrays):
                if a is not None:
                    out[i, : a.shape[0]] = a
            inputs[name] = out
            masks[name] = torch.arange(out.shape[1]) < lengths.unsqueeze(1)
        else:
            inputs[name] = torch.stack([a if a is not None else torch.zeros_like(example) for a in arrays])
    target = torch.as_tensor(np.asarray([s["target"] for s in samples]))
    return MultimodalBatch(inputs=inputs, present=present, target=target, masks=masks)


def _guess_spec(name: str, value) -> ModalitySpec:
    if isinstance(value, str):
        return ModalitySpec(name, "text", ())
    shape = tuple(np.shape(value))
    if len(shape) == 2:
        return ModalitySpec(name, "sequence", (None, shape[1]))
    return ModalitySpec(name, "image" if len(shape) == 3 else "vector", shape)


class MultimodalDataset(torch.utils.data.Dataset):
    """``N`` samples of several modalities, held in memory, that batches by fancy indexing.

    Args:
        specs: modality name -> spec.
        inputs: modality name -> ``[N, ...]`` array (``[N, Lmax, C]`` zero-padded for a
            sequence, with ``lengths``), or ``N`` strings for text.
        target: ``[N]`` labels (int) or values (float).
        present: modality name -> bool ``[N]`` (default: all present).
        lengths: sequence modality name -> ``[N]`` valid lengths (default: full length).
        classes: class names, for classification.
        task_type: "classification" or "regression".
        groups: optional ``[N]`` group id (a subject, a speaker) for grouped splits.
        extras: optional per-sample tensors ``[N, ...]`` that are not inputs (ground truth of
            a synthetic task, ids); kept by ``subset`` and passed on in ``batch().meta``.

    Rows of samples that lack a modality are zeroed here (an empty string for text), so
    nothing a loader left in them can leak to a consumer that forgets ``present``.
    """

    def __init__(
        self,
        *,
        specs: Mapping[str, ModalitySpec],
        inputs: Mapping[str, np.ndarray | Tensor | Sequence[str]],
        target: np.ndarray | Tensor,
        present: Mapping[str, np.ndarray | Tensor] | None = None,
        lengths: Mapping[str, np.ndarray | Tensor] | None = None,
        classes: Sequence[str] | None = None,
        task_type: str = "classification",
        groups: np.ndarray | Tensor | None = None,
        extras: Mapping[str, np.ndarray | Tensor] | None = None,
    ) -> None:
        if task_type not in TASK_TYPES:
            raise ValueError(f"unknown task type {task_type!r}; choose one of {TASK_TYPES}")
        self.specs = dict(specs)
        self.task_type = task_type
        self.classes = tuple(classes) if classes is not None else None
        dtype = torch.long if task_type == "classification" else torch.float32
        self.target = torch.as_tensor(np.asarray(target)).to(dtype)
        n = int(self.target.shape[0])
        if set(inputs) != set(self.specs):
            raise ValueError(
                f"inputs name modalities {sorted(inputs)} but specs name {sorted(self.specs)}; they must match"
            )
        self.inputs: dict[str, Tensor | list[str]] = {}
        for name, value in inputs.items():
            if self.specs[name].kind == "text":
                value = [str(v) for v in value]
            else:
                value = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value).float()
            if len(value) != n:
                raise ValueError(f"modality {name!r} has {len(value)} samples but the target has {n}")
            self.inputs[name] = value
        self.present = {
            name: torch.as_tensor(np.asarray((present or {}).get(name, np.ones(n, dtype=bool)))).bool()
            for name in self.specs
        }
        self.lengths = {}
        for name, spec in self.specs.items():
            if spec.variable_length:
                full = torch.full((n,), self.inputs[name].shape[1], dtype=torch.long)
                given = (lengths or {}).get(name)
                self.lengths[name] = full if given is None else torch.as_tensor(np.asarray(given)).long()
        self.groups = None if groups is None else torch.as_tensor(np.asarray(groups))
        self.extras = {k: torch.as_tensor(np.asarray(v)) for k, v in (extras or {}).items()}
        for what, values in (
            ("groups", {"groups": self.groups} if groups is not None else {}),
            ("extras", self.extras),
        ):
            for key, value in values.items():
                if len(value) != n:
                    raise ValueError(f"{what} {key!r} has {len(value)} rows but the target has {n}")
        for name, flags in self.present.items():
            if flags.shape != (n,):
                raise ValueError(f"present[{name!r}] must have shape ({n},), got {tuple(flags.shape)}")
            absent = ~flags
            if bool(absent.any()):
                value = self.inputs[name]
                if isinstance(value, list):
                    self.inputs[name] = ["" if a else v for v, a in zip(value, absent.tolist(), strict=True)]
                else:  # out of place: the caller's array may share memory with this tensor
                    self.inputs[name] = value.masked_fill(absent.view(-1, *[1] * (value.dim() - 1)), 0.0)

    def __len__(self) -> int:
        return int(self.target.shape[0])

    @property
    def num_classes(self) -> int | None:
        if self.task_type != "classification":
            return None
        return len(self.classes) if self.classes is not None else int(self.target.max()) + 1

    def __getitem__(self, i: int) -> dict:
        """One sample as a dict, ``None`` for a missing modality (see ``collate``)."""
        sample_inputs = {}
        for name, value in self.inputs.items():
            if not self.present[name][i]:
                sample_inputs[name] = None
            elif name in self.lengths:
                sample_inputs[name] = value[i, : int(self.lengths[name][i])]
            else:
                sample_inputs[name] = value[i]
        return {"inputs": sample_inputs, "target": self.target[i]}

    def batch(self, index: Tensor | np.ndarray | Sequence[int]) -> MultimodalBatch:
        """The samples at ``index`` as one batch, by indexing whole tensors (no per-sample loop)."""
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        inputs, present, masks = {}, {}, {}
        for name, value in self.inputs.items():
            present[name] = self.present[name][index]
            if not bool(present[name].any()):
                continue
            if isinstance(value, list):
                inputs[name] = [
                    value[i] if p else "" for i, p in zip(index.tolist(), present[name].tolist(), strict=True)
                ]
                continue
            rows = value[index]
            if name in self.lengths:
                lengths = self.lengths[name][index] * present[name]
                rows = rows[:, : max(int(lengths.max()), 1)]
                masks[name] = torch.arange(rows.shape[1]) < lengths.unsqueeze(1)
            inputs[name] = rows
        meta = {"index": index, **{k: v[index] for k, v in self.extras.items()}}
        return MultimodalBatch(inputs=inputs, present=present, target=self.target[index], masks=masks, meta=meta)

    def subset(self, index: Tensor | np.ndarray | Sequence[int]) -> MultimodalDataset:
        """A new dataset with the samples at ``index`` (tensors are indexed, not shared)."""
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return MultimodalDataset(
            specs=self.specs,
            inputs={
                k: ([v[i] for i in index.tolist()] if isinstance(v, list) else v[index]) for k, v in self.inputs.items()
            },
            target=self.target[index],
            present={k: v[index] for k, v in self.present.items()},
            lengths={k: v[index] for k, v in self.lengths.items()},
            classes=self.classes,
            task_type=self.task_type,
            groups=None if self.groups is None else self.groups[index],
            extras={k: v[index] for k, v in self.extras.items()},
        )

    def replace(
        self,
        *,
        inputs: Mapping[str, Tensor | Sequence[str]] | None = None,
        present: Mapping[str, Tensor] | None = None,
    ) -> MultimodalDataset:
        """A new dataset with some modalities' inputs or present flags replaced (the rest
        shared, not copied). Rows of newly absent samples are zeroed in the new dataset."""
        return MultimodalDataset(
            specs=self.specs,
            inputs={**self.inputs, **(inputs or {})},
            target=self.target,
            present={**self.present, **(present or {})},
            lengths=self.lengths,
            classes=self.classes,
            task_type=self.task_type,
            groups=self.groups,
            extras=self.extras,
        )

    def select(self, modalities: Sequence[str]) -> MultimodalDataset:
        """A new dataset with only these modalities (the others are gone, not absent).

        Samples left with none of them are dropped, since no model can predict them.
        """
        unknown = [m for m in modalities if m not in self.specs]
        if unknown or not modalities:
            raise ValueError(f"select needs some of the modalities {list(self.specs)}; got {list(modalities)}")
        keep = torch.zeros(len(self), dtype=torch.bool)
        for m in modalities:
            keep |= self.present[m]
        selected = MultimodalDataset(
            specs={m: self.specs[m] for m in modalities},
            inputs={m: self.inputs[m] for m in modalities},
            target=self.target,
            present={m: self.present[m] for m in modalities},
            lengths={m: v for m, v in self.lengths.items() if m in modalities},
            classes=self.classes,
            task_type=self.task_type,
            groups=self.groups,
            extras=self.extras,
        )
        return selected if bool(keep.all()) else selected.subset(keep.nonzero().squeeze(1))

    def batches(
        self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False
    ) -> Iterator[MultimodalBatch]:
        """Iterate over batches; ``shuffle`` permutes with ``seed`` (same seed, same order)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield self.batch(order[start : start + batch_size])


def concat(datasets: Sequence[MultimodalDataset]) -> MultimodalDataset:
    """One dataset of the samples of ``datasets`` in order (the splits of one task: same specs,
    classes and task type); sequences are zero-padded to the longest."""
    first = datasets[0]
    for other in datasets[1:]:
        if set(other.specs) != set(first.specs) or other.task_type != first.task_type or other.classes != first.classes:
            raise ValueError("concat joins datasets of one task: same modalities, task type and classes")
    inputs: dict[str, Tensor | list[str]] = {}
    for name in first.specs:
        values = [d.inputs[name] for d in datasets]
        if isinstance(values[0], list):
            inputs[name] = [v for chunk in values for v in chunk]
            continue
        if first.specs[name].variable_length:
            steps = max(v.shape[1] for v in values)
            values = [torch.nn.functional.pad(v, (0, 0, 0, steps - v.shape[1])) for v in values]
        inputs[name] = torch.cat(values)
    groups = [d.groups for d in datasets]
    extras = set.intersection(*(set(d.extras) for d in datasets))
    return MultimodalDataset(
        specs=first.specs,
        inputs=inputs,
        target=torch.cat([d.target for d in datasets]),
        present={m: torch.cat([d.present[m] for d in datasets]) for m in first.specs},
        lengths={m: torch.cat([d.lengths[m] for d in datasets]) for m in first.lengths},
        classes=first.classes,
        task_type=first.task_type,
        groups=None if any(g is None for g in groups) else torch.cat(groups),
        extras={k: torch.cat([d.extras[k] for d in datasets]) for k in sorted(extras)},
    )


@dataclass
class Task:
    """A task: its splits and what it is.

    Attributes:
        name: the registry name.
        splits: "train", "valid", "test" -> dataset.
        description: provenance, license and processing, for ``modalmoe data describe``.
        provenance: where the data was read from, for data directories
            (``data.formats.directory.fingerprint``: path and content hash); None for a
            bundled task (its sources are pinned by hash) or a task built in memory.
    """

    name: str
    splits: dict[str, MultimodalDataset]
    description: str = ""
    provenance: dict | None = None

    def select(self, modalities: Sequence[str]) -> Task:
        """The task restricted to these modalities (see ``MultimodalDataset.select``)."""
        return Task(
            name=self.name,
            splits={k: v.select(modalities) for k, v in self.splits.items()},
            description=self.description,
            provenance=self.provenance,
        )

    @property
    def train(self) -> MultimodalDataset:
        return self.splits["train"]

    @property
    def valid(self) -> MultimodalDataset:
        return self.splits["valid"]

    @property
    def test(self) -> MultimodalDataset:
        return self.splits["test"]

    @property
    def specs(self) -> dict[str, ModalitySpec]:
        return self.train.specs

    @property
    def modalities(self) -> list[str]:
        return list(self.specs)
