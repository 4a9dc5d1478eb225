"""Missing-modality and noise protocols: pure, seeded corruptions of a dataset or a batch.

Every protocol takes a ``MultimodalDataset`` (a whole split: imbalance at train time, a fixed
test-time protocol) or a ``MultimodalBatch`` (on the fly), and returns a *new* object of the
same type; inputs are never modified in place. Tensors a protocol does not change are shared
with the input, not copied. Randomness comes from a local generator seeded by ``seed`` and the
protocol and modality names, never from global RNG state: the same seed gives the same
result, and two modalities corrupted with the same seed get independent draws.

Absent is a fact, not a value: dropping a modality sets ``present`` to False, and the
placeholder rows of the newly absent samples are zeroed (an empty string for text; False in
a batch's sequence mask) so that no real data leaks through a consumer that forgets
``present``. A batch no longer carries a modality that no sample has (see ``data/batch.py``).

Graded severities are integer levels ``0..5``; level 0 is the identity:

========  =====================  ======================  ===================================
level     ``add_noise`` std      categorical resample    ``mask`` fraction
========  =====================  ======================  ===================================
0         0                      0                       0
1         0.25                   0.05                    0.1
2         0.5                    0.1                     0.25
3         1.0                    0.2                     0.5
4         1.5                    0.35                    0.75
5         2.0                    0.5                     0.9
========  =====================  ======================  ===================================

The noise std is relative to each feature's std (see ``feature_std``).

A batch carries no ``ModalitySpec``: for a batch the kind is inferred (text is a list of
strings, a sequence has a mask, a 4-D tensor is an image, anything else a vector); pass
``spec=`` for tabular data so its categorical columns are known.
"""

from __future__ import annotations

import math
import operator
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from modalmoe.data.batch import ModalitySpec, MultimodalBatch, MultimodalDataset

Data = TypeVar("Data", MultimodalDataset, MultimodalBatch)

NOISE_STD = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
"""``add_noise``: Gaussian noise std per level, as a multiple of the feature's std."""
RESAMPLE_PROB = (0.0, 0.05, 0.1, 0.2, 0.35, 0.5)
"""``add_noise``: per level, the probability that a categorical cell is replaced by a uniform draw."""
MASK_FRACTION = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)
"""``mask``: fraction of time steps / patches / features / words masked per level."""
LEVELS = tuple(range(len(NOISE_STD)))


# ----------------------------------------------------------------------------- protocols


def drop_modalities(data: Data, names: str | Iterable[str]) -> Data:
    """A fixed subset of modalities absent for every sample.

    Args:
        data: dataset or batch.
        names: modality name(s) to drop.

    Returns:
        A copy where ``present[name]`` is all False for each named modality (and, for a
        batch, the modality is gone from ``inputs`` and ``masks``).
    """
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        _check_modality(data, name)
    return _set_present(data, {name: torch.zeros_like(data.present[name]) for name in names})


def drop_at_rate(
    data: Data,
    rate: float | Mapping[str, float],
    *,
    seed: int,
    modalities: Iterable[str] | None = None,
    keep_one: bool = True,
) -> Data:
    """Each modality independently absent per sample with probability ``rate``.

    With ``keep_one``, a sample that would lose every modality it had gets one of them back,
    drawn uniformly among the ones this call dropped. With equal rates ``r`` over ``M``
    modalities that are all present, the effective absent rate is then ``r - r**M / M``.
    Samples that had no modality to begin with stay empty.

    Args:
        data: dataset or batch (``N`` samples).
        rate: one probability for every modality in ``modalities``, or modality -> probability
            (then only those modalities are dropped and ``modalities`` must be None).
        seed: seed of the draw.
        modalities: which modalities may be dropped (default: all).
        keep_one: guarantee every sample keeps at least one modality.

    Returns:
        A copy with updated ``present`` flags.
    """
    if isinstance(rate, Mapping):
        if modalities is not None:
            raise ValueError("give either a rate per modality (a dict) or `modalities`, not both")
        rates = {name: _probability(r, f"rate[{name!r}]") for name, r in rate.items()}
    else:
        names = list(data.present) if modalities is None else list(modalities)
        rates = dict.fromkeys(names, _probability(rate, "rate"))
    names = list(rates)
    for name in names:
        _check_modality(data, name)
    if not names:
        return _rebuild(data)
    g = _generator(seed, "drop_at_rate")
    n = len(data)
    before = torch.stack([data.present[name].cpu() for name in names], 1)  # [N, M]
    drawn = torch.rand(n, len(names), generator=g) < torch.tensor([rates[k] for k in names])
    after = before & ~drawn
    # Draw the re-enabled modality for every row (not only the empty ones) so the stream
    # of random numbers, hence the result, does not depend on which rows needed it.
    pick = torch.rand(n, len(names), generator=g).masked_fill(~before, -1.0).argmax(1)
    if keep_one:
        others = [data.present[k].cpu() for k in data.present if k not in rates]
        kept_elsewhere = torch.stack(others, 1).any(1) if others else torch.zeros(n, dtype=torch.bool)
        emptied = before.any(1) & ~after.any(1) & ~kept_elsewhere
        after[emptied, pick[emptied]] = True
    device = data.present[names[0]].device
    return _set_present(data, {name: after[:, j].to(device) for j, name in enumerate(names)})


def add_noise(
    data: Data,
    modality: str,
    severity: int,
    *,
    seed: int,
    scale: Tensor | float | None = None,
    spec: ModalitySpec | None = None,
) -> Data:
    """Gaussian noise of graded severity on an image, sequence, vector or tabular modality.

    Noise ``NOISE_STD[severity] * scale * eps`` is added to the real values only: absent
    samples and sequence padding are untouched. Categorical tabular columns get no Gaussian
    noise; each of their cells is instead replaced with probability ``RESAMPLE_PROB[severity]``
    by a category drawn uniformly (possibly the same one).

    Args:
        data: dataset or batch.
        modality: the modality to corrupt (not text: use ``mask`` for word dropout).
        severity: level in ``LEVELS`` (0 is the identity).
        seed: seed of the draw.
        scale: per-feature std (``[F]`` vector/tabular, ``[C]`` sequence/image channels) or a
            float; default ``feature_std(data, modality)``. Pass the train split's std to
            corrupt small batches or a test split on the train scale.
        spec: for a batch, the modality's spec (needed to know tabular categorical columns).

    Returns:
        A copy with the noisy modality.
    """
    level = _level(severity)
    spec = _spec(data, modality, spec)
    if spec is not None and spec.kind == "text":
        raise ValueError(f"modality {modality!r} is text: Gaussian noise does not apply; use mask() (word dropout)")
    x = data.inputs.get(modality)
    if level == 0 or x is None:
        return _rebuild(data)
    g = _generator(seed, f"add_noise/{modality}")
    std = feature_std(data, modality, spec=spec) if scale is None else torch.as_tensor(scale, dtype=x.dtype)
    std = std.to(x.device)
    if std.dim() == 1 and spec.kind == "image":
        std = std.view(-1, 1, 1)  # per channel of [C, H, W]
    valid = _expand(_valid(data, modality), x).to(x.dtype)
    eps = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
    noisy = x + NOISE_STD[level] * std * eps * valid
    if spec.kind == "tabular" and spec.categorical:
        columns = list(spec.categorical)
        cards = torch.tensor([spec.categorical[c] for c in columns], dtype=x.dtype)
        flip = torch.rand(x.shape[0], len(columns), generator=g) < RESAMPLE_PROB[level]
        draws = torch.floor(torch.rand(x.shape[0], len(columns), generator=g) * cards)
        flip = flip.to(x.device) & data.present[modality][:, None]
        noisy[:, columns] = torch.where(flip, draws.to(x.device), x[:, columns])
    return _rebuild(data, inputs={modality: noisy})


def mask(
    data: Data,
    modality: str,
    severity: int,
    *,
    seed: int,
    patch: int | None = None,
    spec: ModalitySpec | None = None,
) -> Data:
    """Mask a graded fraction of each sample: time steps, image patches, features or words.

    Per present sample with ``n`` units (valid time steps of a sequence, patches of an
    image, features of a vector or tabular row, whitespace-separated words of a text),
    ``floor(f * n + u)`` units are masked, ``f = MASK_FRACTION[severity]`` and ``u`` uniform
    in ``[0, 1)``: exactly ``f * n`` in expectation. Masked values are set to zero (the mean
    of standardized features; code 0 of a categorical column); masked words are removed.
    Sequence masks are unchanged (a zeroed step is a corrupted reading, not padding), and
    absent samples are untouched.

    Args:
        data: dataset or batch.
        modality: the modality to mask.
        severity: level in ``LEVELS`` (0 is the identity).
        seed: seed of the draw.
        patch: image patch side in pixels (default ``max(1, min(H, W) // 8)``, an 8x8 grid);
            edge patches are cropped when the side does not divide the image.
        spec: for a batch, the modality's spec (kind inference is used otherwise).

    Returns:
        A copy with the masked modality.
    """
    level = _level(severity)
    spec = _spec(data, modality, spec)
    x = data.inputs.get(modality)
    if level == 0 or x is None:
        return _rebuild(data)
    g = _generator(seed, f"mask/{modality}")
    fraction = MASK_FRACTION[level]
    present = data.present[modality].cpu()
    if spec.kind == "text":
        rng = np.random.default_rng(_seed(seed, f"mask/{modality}"))
        out = []
        for text, p in zip(x, present.tolist(), strict=True):
            words = text.split()
            if p and words:
                k = math.floor(fraction * len(words) + rng.random())
                dropped = set(rng.choice(len(words), size=k, replace=False).tolist())
                text = " ".join(w for i, w in enumerate(words) if i not in dropped)
            out.append(text)
        return _rebuild(data, inputs={modality: out})
    if spec.kind == "sequence":
        units = _valid(data, modality).cpu()  # [N, L] time steps
        chosen = _choose(units, fraction, g)[..., None]  # [N, L, 1]
    elif spec.kind == "image":
        h, w = x.shape[-2:]
        side = patch if patch is not None else max(1, min(h, w) // 8)
        if side < 1:
            raise ValueError(f"patch must be >= 1, got {side}")
        gh, gw = -(-h // side), -(-w // side)
        units = present[:, None].expand(-1, gh * gw)
        grid = _choose(units, fraction, g).view(-1, gh, gw)
        chosen = grid.repeat_interleave(side, 1).repeat_interleave(side, 2)[:, None, :h, :w]  # [N, 1, H, W]
    else:
        units = present[:, None].expand(-1, x.shape[-1])  # [N, F] features
        chosen = _choose(units, fraction, g)
    return _rebuild(data, inputs={modality: x.masked_fill(chosen.to(x.device), 0.0)})


def imbalance(
    dataset: MultimodalDataset, modality: str, fraction: float, *, seed: int, stratify: bool = True
) -> MultimodalDataset:
    """A modality kept for only ``fraction`` of the samples that carry it (e.g. a train split).

    ``fraction * n`` (rounded half up) of the ``n`` samples that carry the modality keep it. With
    ``stratify`` and a classification dataset, each class keeps the same fraction (largest
    remainder rounding, so the total is exact); otherwise the kept samples are a uniform draw.
    A sample whose only modality is removed becomes empty: combine with care.

    Args:
        dataset: the dataset (batches are not supported: imbalance is a property of a split).
        modality: the modality to make scarce.
        fraction: in ``[0, 1]``.
        seed: seed of the draw.
        stratify: keep the class balance among the samples that keep the modality.

    Returns:
        A copy with updated ``present[modality]``.
    """
    if not isinstance(dataset, MultimodalDataset):
        raise TypeError(f"imbalance applies to a MultimodalDataset, got {type(dataset).__name__}")
    _check_modality(dataset, modality)
    fraction = _probability(fraction, "fraction")
    rng = np.random.default_rng(_seed(seed, f"imbalance/{modality}"))
    flags = dataset.present[modality]
    carriers = flags.cpu().nonzero().squeeze(1).numpy()
    total = math.floor(fraction * len(carriers) + 0.5)
    if stratify and dataset.task_type == "classification":
        labels = dataset.target.cpu().numpy()[carriers]
        classes, counts = np.unique(labels, return_counts=True)
        exact = counts * fraction
        quota = np.floor(exact).astype(int)
        # Largest remainders get the leftover slots; a stable sort keeps ties deterministic.
        order = np.argsort(-(exact - quota), kind="stable")
        quota[order[: total - quota.sum()]] += 1
        keep = [rng.choice(carriers[labels == c], size=q, replace=False) for c, q in zip(classes, quota, strict=True)]
        keep = np.concatenate(keep) if keep else np.zeros(0, dtype=int)
    else:
        keep = rng.choice(carriers, size=total, replace=False)
    new = torch.zeros_like(flags)
    new[torch.as_tensor(keep, dtype=torch.long)] = True
    return _set_present(dataset, {modality: new})


PROTOCOLS: dict[str, Callable] = {
    "drop": drop_modalities,
    "drop_at_rate": drop_at_rate,
    "noise": add_noise,
    "mask": mask,
    "imbalance": imbalance,
}
"""Protocol name -> function, for the command line."""


def describe() -> dict[str, str]:
    """Protocol name -> the first line of its docstring."""
    return {name: (fn.__doc__ or "").strip().splitlines()[0] for name, fn in PROTOCOLS.items()}


# ----------------------------------------------------------------------------- statistics


def feature_std(
    data: MultimodalDataset | MultimodalBatch, modality: str, *, spec: ModalitySpec | None = None
) -> Tensor:
    """Std of each feature over the real values (present samples, valid time steps).

    Args:
        data: dataset or batch.
        modality: an image, sequence, vector or tabular modality.
        spec: for a batch, the modality's spec (tabular categorical columns).

    Returns:
        ``[F]`` for vector/tabular (0 for categorical columns), ``[C]`` per channel for
        sequence and image; zeros when fewer than two values are available.
    """
    spec = _spec(data, modality, spec)
    x = data.inputs.get(modality)
    if spec is None or spec.kind == "text" or x is None:
        raise ValueError(f"modality {modality!r} has no numeric values here to take a std of")
    valid = _valid(data, modality)
    if spec.kind == "image":
        rows = x[valid].movedim(1, -1).reshape(-1, x.shape[1])  # [K*H*W, C]
    else:
        rows = x[valid]  # [K, F] or [K, C]
    if rows.shape[0] < 2:
        return x.new_zeros(x.shape[-1] if spec.kind != "image" else x.shape[1])
    std = rows.std(0, correction=0)
    if spec.kind == "tabular" and spec.categorical:
        std[list(spec.categorical)] = 0.0
    return std


# ----------------------------------------------------------------------------- helpers


def _check_modality(data: MultimodalDataset | MultimodalBatch, name: str) -> None:
    if name not in data.present:
        raise ValueError(f"unknown modality {name!r}; known modalities: {', '.join(data.present)}")


def _probability(value: float, what: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value}")
    return value


def _level(severity: int) -> int:
    try:
        level = operator.index(severity)
    except TypeError:
        raise ValueError(f"severity must be an integer level in {LEVELS}, got {severity!r}") from None
    if level not in LEVELS:
        raise ValueError(f"severity must be an integer level in {LEVELS}, got {level}")
    return level


def _seed(seed: int, tag: str) -> int:
    """A 63-bit seed from the user's seed and a tag, so protocols and modalities draw independently."""
    if operator.index(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    state = np.random.SeedSequence([operator.index(seed), zlib.crc32(tag.encode())]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _generator(seed: int, tag: str) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(seed, tag))


def _spec(data: MultimodalDataset | MultimodalBatch, name: str, spec: ModalitySpec | None) -> ModalitySpec | None:
    """The modality's spec: the dataset's, the one given, or inferred from the batch (None if absent)."""
    _check_modality(data, name)
    if isinstance(data, MultimodalDataset):
        return data.specs[name]
    if spec is not None:
        return spec
    value = data.inputs.get(name)
    if value is None:
        return None
    if isinstance(value, list):
        return ModalitySpec(name, "text", ())
    if name in data.masks:
        return ModalitySpec(name, "sequence", (None, *value.shape[2:]))
    return ModalitySpec(name, "image" if value.dim() == 4 else "vector", tuple(value.shape[1:]))


def _valid(data: MultimodalDataset | MultimodalBatch, name: str) -> Tensor:
    """Where the real values are: ``[N]`` present flags, or ``[N, L]`` for a sequence."""
    present = data.present[name]
    if isinstance(data, MultimodalDataset):
        if name not in data.lengths:
            return present
        steps = torch.arange(data.inputs[name].shape[1], device=present.device)
        return present[:, None] & (steps < data.lengths[name][:, None])
    if name in data.masks:
        return present[:, None] & data.masks[name]
    return present


def _expand(valid: Tensor, x: Tensor) -> Tensor:
    """``valid`` ``[N]`` or ``[N, L]`` viewed with trailing singleton axes, broadcastable to ``x``."""
    return valid.view(*valid.shape, *[1] * (x.dim() - valid.dim()))


def _choose(units: Tensor, fraction: float, g: torch.Generator) -> Tensor:
    """Per row, ``floor(fraction * n + u)`` of its ``n`` valid units, uniformly: bool like ``units``."""
    n = units.sum(1)
    k = torch.floor(fraction * n + torch.rand(n.shape, generator=g)).long()
    # Invalid units score 2 > any uniform draw, so they rank last and are never chosen.
    scores = torch.rand(units.shape, generator=g).masked_fill(~units, 2.0)
    ranks = scores.argsort(1).argsort(1)
    return (ranks < k[:, None]) & units


def _set_present(data: Data, present: Mapping[str, Tensor]) -> Data:
    """Copy with new ``present`` flags; placeholders of newly absent samples are zeroed."""
    inputs, masks = {}, {}
    for name, flags in present.items():
        removed = data.present[name] & ~flags
        value = data.inputs.get(name)
        if value is None or not bool(removed.any()):
            continue
        if isinstance(value, list):
            inputs[name] = ["" if r else v for v, r in zip(value, removed.tolist(), strict=True)]
        else:
            inputs[name] = value.masked_fill(_expand(removed, value), 0.0)
        if isinstance(data, MultimodalBatch) and name in data.masks:
            masks[name] = data.masks[name] & flags[:, None]
    return _rebuild(data, inputs=inputs, present=present, masks=masks)


def _rebuild(
    data: Data,
    *,
    inputs: Mapping[str, Tensor | list[str]] | None = None,
    present: Mapping[str, Tensor] | None = None,
    masks: Mapping[str, Tensor] | None = None,
) -> Data:
    """A new object of the same type with some entries replaced (the rest shared)."""
    if isinstance(data, MultimodalDataset):
        return data.replace(inputs=inputs, present=present)
    new_present = {**data.present, **(present or {})}
    new_inputs = {**data.inputs, **(inputs or {})}
    new_masks = {**data.masks, **(masks or {})}
    for name, flags in new_present.items():
        if not bool(flags.any()):  # the batch contract: no sample has it, so it is not in inputs
            new_inputs.pop(name, None)
            new_masks.pop(name, None)
    return replace(data, inputs=new_inputs, present=new_present, masks=new_masks, meta=dict(data.meta))
