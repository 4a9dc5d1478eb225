"""A mixture of tasks: one task whose samples come from several tasks, for one model over all.

Provenance: composed in memory from the member tasks (each pinned and checked as usual); no
download of its own, no license beyond the members'.

``load_task("mixture", tasks=[...])`` joins the members' splits into one task:

- **Modalities stay distinct per task**: member ``t``'s modality ``m`` is the mixture's
  modality ``"t/m"``, carried only by ``t``'s samples (``present`` is False for every other
  task's samples, so each modality gets its own encoder and no sample meets another task's
  placeholders). ``share`` names a modality several members feed into (``{"image":
  ["av-digits/image", "mfeat/pixels"]}``): one encoder then serves them all; their specs must
  agree on kind and shape.
- **Classes are the members' classes side by side**: member ``t``'s class ``c`` is the
  mixture's class ``"t/c"``, its label offset by the classes of the members before it. A
  sample's own task is ``extras["task"]`` (``batch().meta["task"]``), the member's index in
  ``tasks``; ``layout(dataset)`` gives each member's label range, so heads, metrics and
  samplers can stay within a task (``MixtureLayout``).
- ``limit`` caps each member's splits (a seeded random subset per split; an int for every
  member or a mapping from member to int), so a mixture of a 48k-sample task with 2k-sample
  tasks can be trained in a CPU budget; a member left out of the mapping keeps all.

Samples of different tasks never share a sample row, so early fusion, which attends only
within a sample, never mixes them. Only classification members are supported (their labels
form the union); a regression member raises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from modalmoe.data.batch import ModalitySpec, MultimodalDataset, Task
from modalmoe.data.splits import limit_task
from modalmoe.data.tasks import BundledTask, load_task, tasks

#: Separates a member's label from its modality and class names (``"av-digits/image"``).
SEP = "/"


@dataclass(frozen=True)
class MixtureLayout:
    """Where each member task sits in a mixture's labels.

    Attributes:
        names: the members' labels, in task-id order (id i is ``names[i]``).
        starts: [G] the first mixture label of each member.
        sizes: [G] each member's number of classes.
    """

    names: tuple[str, ...]
    starts: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return self.starts[-1] + self.sizes[-1] if self.names else 0

    def class_task(self) -> torch.Tensor:
        """[C] the member id each mixture label belongs to."""
        return torch.repeat_interleave(torch.arange(len(self.names)), torch.tensor(self.sizes))

    def local(self, label: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Mixture labels [B] of samples of member ids ``task`` [B] -> the member's own labels."""
        return label - torch.tensor(self.starts, device=label.device)[task]


def layout(dataset: MultimodalDataset) -> MixtureLayout | None:
    """A mixture dataset's member layout, read from its class names (``"task/class"``) and its
    ``extras["task"]``; None for a dataset that is not a mixture."""
    if "task" not in dataset.extras or dataset.classes is None or not all(SEP in c for c in dataset.classes):
        return None
    names: list[str] = []
    starts: list[int] = []
    sizes: list[int] = []
    for index, name in enumerate(c.split(SEP, 1)[0] for c in dataset.classes):
        if names and names[-1] == name:
            sizes[-1] += 1
            continue
        if name in names:
            return None  # a member's classes are contiguous in a mixture
        names.append(name)
        starts.append(index)
        sizes.append(1)
    return MixtureLayout(names=tuple(names), starts=tuple(starts), sizes=tuple(sizes))


def task_groups(dataset: MultimodalDataset) -> list[torch.Tensor]:
    """The rows of each member of a mixture, in task-id order (one group, every row, for a
    dataset without ``extras["task"]``)."""
    task = dataset.extras.get("task")
    if task is None:
        return [torch.arange(len(dataset))]
    task = torch.as_tensor(task).reshape(-1)
    return [(task == t).nonzero().squeeze(-1) for t in torch.unique(task).tolist()]


def _members(spec) -> dict[str, tuple[str, dict]]:
    """``tasks`` option -> member label -> (task name or path, its options)."""
    if isinstance(spec, str) or not isinstance(spec, Sequence | Mapping) or not spec:
        raise ValueError(
            f"mixture: tasks lists the member tasks (e.g. tasks: [av-digits, watch-imu]) or maps labels to "
            f"them (tasks: {{digits: av-digits}}), got {spec!r}"
        )
    items = spec.items() if isinstance(spec, Mapping) else ((None, s) for s in spec)
    members: dict[str, tuple[str, dict]] = {}
    for label, source in items:
        options: dict = {}
        if isinstance(source, Mapping):  # {name: synthetic, options: {...}}
            unknown = sorted(set(source) - {"name", "options"})
            if "name" not in source or unknown:
                raise ValueError(
                    f"mixture: a member given as a mapping has keys name and options, got {sorted(source)}"
                )
            source, options = source["name"], dict(source.get("options") or {})
        source = str(source)
        label = str(label) if label is not None else source.rstrip("/").rsplit("/", 1)[-1]
        if SEP in label or not label:
            raise ValueError(
                f"mixture: member label {label!r} may not contain {SEP!r}; name it (tasks: {{label: path}})"
            )
        if label in members:
            raise ValueError(
                f"mixture: two members are labelled {label!r}; give them labels (tasks: {{a: ..., b: ...}})"
            )
        members[label] = (source, options)
    return members


def _shared(share: Mapping[str, Sequence[str]] | None, specs: Mapping[str, ModalitySpec]) -> dict[str, str]:
    """``share`` option -> member modality ("t/m") -> the mixture modality it feeds."""
    if share is None:
        return {}
    if not isinstance(share, Mapping):
        raise ValueError(
            f"mixture: share maps a shared modality to member modalities (image: [a/image, b/image]), got {share!r}"
        )
    target: dict[str, str] = {}
    for name, sources in share.items():
        name = str(name)
        if isinstance(sources, str) or not isinstance(sources, Sequence) or not sources:
            raise ValueError(
                f"mixture: share.{name} lists member modalities such as [a/image, b/image], got {sources!r}"
            )
        if name in specs and name not in sources:
            raise ValueError(f"mixture: share.{name} would hide the member modality {name!r}; pick another name")
        for source in sources:
            if source not in specs:
                raise ValueError(
                    f"mixture: share.{name} names {source!r}, not a member modality; they are {sorted(specs)}"
                )
            if source in target:
                raise ValueError(f"mixture: {source!r} is shared twice (as {target[source]!r} and {name!r})")
            first, spec = specs[sources[0]], specs[source]
            if (spec.kind, spec.shape, spec.categorical) != (first.kind, first.shape, first.categorical):
                raise ValueError(
                    f"mixture: share.{name} joins {sources[0]!r} ({first.kind} {first.shape}) and {source!r} "
                    f"({spec.kind} {spec.shape}); shared modalities need one kind and shape"
                )
            target[source] = name
    return target


def make_mixture(members: Mapping[str, Task], share=None) -> Task:
    """Join loaded member tasks (label -> task) into one mixture task (module docstring)."""
    specs: dict[str, ModalitySpec] = {}
    for label, task in members.items():
        if task.train.task_type != "classification":
            raise ValueError(
                f"mixture: member {label!r} is a {task.train.task_type} task; a mixture joins classification tasks"
            )
        for name, spec in task.specs.items():
            specs[f"{label}{SEP}{name}"] = ModalitySpec(
                name=f"{label}{SEP}{name}",
                kind=spec.kind,
                shape=spec.shape,
                categorical=spec.categorical,
                columns=spec.columns,
                description=spec.description,
                categories=spec.categories,
            )
    into = _shared(share, specs)
    mixture_specs: dict[str, ModalitySpec] = {}
    for name, spec in specs.items():
        out = into.get(name, name)
        mixture_specs.setdefault(out, ModalitySpec(**{**spec.__dict__, "name": out}))
    classes = [f"{label}{SEP}{c}" for label, task in members.items() for c in _class_names(task)]
    splits = {}
    for split in ("train", "valid", "test"):
        parts = [(label, task.splits[split]) for label, task in members.items()]
        splits[split] = _join(parts, specs, into, mixture_specs, classes)
    lines = [f"A mixture of {len(members)} tasks ({', '.join(members)}); modalities and classes are prefixed by task."]
    for label, task in members.items():
        sizes = ", ".join(f"{s} {len(task.splits[s])}" for s in ("train", "valid", "test"))
        lines.append(f"- {label} ({task.name}): {sizes}")
    if into:
        lines.append("Shared modalities: " + "; ".join(f"{src} -> {dst}" for src, dst in into.items()))
    return Task(name="mixture", splits=splits, description="\n".join(lines))


def _class_names(task: Task) -> list[str]:
    data = task.train
    return list(data.classes) if data.classes is not None else [str(i) for i in range(data.num_classes or 0)]


def _join(parts, specs, into, mixture_specs, classes) -> MultimodalDataset:
    """One split of the mixture from the members' datasets of that split."""
    sizes = [len(data) for _, data in parts]
    total = sum(sizes)
    inputs: dict[str, list] = {name: [] for name in mixture_specs}
    present: dict[str, list] = {name: [] for name in mixture_specs}
    lengths: dict[str, list] = {name: [] for name, s in mixture_specs.items() if s.variable_length}
    target, task_ids, offset = [], [], 0
    for index, (label, data) in enumerate(parts):
        n = len(data)
        own = {into.get(f"{label}{SEP}{m}", f"{label}{SEP}{m}"): m for m in data.specs}
        for name in mixture_specs:
            if name in own:
                value = data.inputs[own[name]]
                flags = data.present[own[name]]
                steps = data.lengths.get(own[name])
            else:
                value, flags, steps = None, torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long)
            inputs[name].append(value)
            present[name].append(flags)
            if name in lengths:
                lengths[name].append(steps)
        target.append(data.target + offset)
        task_ids.append(torch.full((n,), index, dtype=torch.long))
        offset += data.num_classes or 0
    joined: dict = {}
    for name, spec in mixture_specs.items():
        chunks = inputs[name]
        if spec.kind == "text":
            joined[name] = [
                v for chunk, n in zip(chunks, sizes, strict=True) for v in (chunk if chunk is not None else [""] * n)
            ]
            continue
        real = [c for c in chunks if c is not None]
        if spec.variable_length:
            steps = max(c.shape[1] for c in real)
            real_shape = (steps, *real[0].shape[2:])
        else:
            real_shape = tuple(real[0].shape[1:])
        rows = torch.zeros(total, *real_shape)
        start = 0
        for chunk, n in zip(chunks, sizes, strict=True):
            if chunk is not None:
                if spec.variable_length:  # padded to the longest member's sequences
                    rows[start : start + n, : chunk.shape[1]] = chunk
                else:
                    rows[start : start + n] = chunk
            start += n
        joined[name] = rows
    return MultimodalDataset(
        specs=mixture_specs,
        inputs=joined,
        target=torch.cat(target),
        present={k: torch.cat(v) for k, v in present.items()},
        lengths={k: torch.cat(v) for k, v in lengths.items()},
        classes=classes,
        task_type="classification",
        extras={"task": torch.cat(task_ids)},
    )


@tasks.register("mixture")
class Mixture(BundledTask):
    """Several tasks joined into one, for one model over all of them
    (``modalmoe.data.tasks.mixture``): options ``tasks`` (the members), ``limit`` (samples per
    split, per member) and ``share`` (modalities several members feed into)."""

    name = "mixture"
    needs_options = True
    summary = "several tasks as one (options: tasks, limit, share): one model over many tasks and modalities"

    def load(self, *, cache=None, wheelhouse=None, refresh: bool = False, **options) -> Task:
        unknown = sorted(set(options) - {"tasks", "limit", "share"})
        if unknown:
            raise ValueError(f"mixture: unknown options {unknown}; it takes tasks, limit and share")
        if "tasks" not in options:
            raise ValueError("mixture: name its member tasks (task_options: {tasks: [av-digits, watch-imu]})")
        members = _members(options["tasks"])
        limit = options.get("limit")
        if isinstance(limit, Mapping):
            unknown = sorted(set(limit) - set(members))
            if unknown:
                raise ValueError(f"mixture: limit names {unknown}, which are not members {list(members)}")
        elif limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ValueError(f"mixture: limit is a positive int or a mapping from member to int, got {limit!r}")
        loaded = {}
        for label, (source, member_options) in members.items():
            if source == "mixture":
                raise ValueError("mixture: a member may not itself be a mixture")
            task = load_task(source, cache=cache, wheelhouse=wheelhouse, refresh=refresh, **member_options)
            cap = limit.get(label) if isinstance(limit, Mapping) else limit
            loaded[label] = limit_task(task, cap)
        return make_mixture(loaded, share=options.get("share"))


def member_task(task: Task, member: str) -> Task:
    """One member of a loaded mixture as a task of its own: its rows of every split, the
    mixture modalities its samples carry (names kept, ``"t/m"`` or shared), and its classes
    (the member's own labels 0..C_t-1 and names) - what a specialist of that member trains on,
    with the same samples, limits and modality names as the generalist.

    Raises:
        ValueError: ``task`` is not a mixture, or has no member ``member``.
    """
    parts = layout(task.train)
    if parts is None:
        raise ValueError(f"task {task.name!r} is not a task mixture (its classes are not prefixed by task)")
    if member not in parts.names:
        raise ValueError(f"the mixture has no member {member!r}; its members are {list(parts.names)}")
    t = parts.names.index(member)
    start, size = parts.starts[t], parts.sizes[t]
    splits = {
        name: data.subset((torch.as_tensor(data.extras["task"]) == t).nonzero().squeeze(-1))
        for name, data in task.splits.items()
    }
    train = splits["train"]  # the modalities the member's training samples carry
    modalities = [m for m in task.specs if bool(train.present[m].any())]
    out = {}
    for name, own in splits.items():
        out[name] = MultimodalDataset(
            specs={m: own.specs[m] for m in modalities},
            inputs={m: own.inputs[m] for m in modalities},
            target=own.target - start,
            present={m: own.present[m] for m in modalities},
            lengths={m: v for m, v in own.lengths.items() if m in modalities},
            classes=[c.split(SEP, 1)[1] for c in task.train.classes[start : start + size]],
            task_type="classification",
        )
    return Task(name=member, splits=out, description=f"member {member!r} of the mixture {task.name!r}")
