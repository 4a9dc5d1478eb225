"""The multimodal model: encoders -> (missing-modality strategy) -> fusion + trunk -> heads.

    from modalmoe.model import build_model, get_preset
    preset = get_preset("av-digits/token-choice")
    model = build_model(preset.model, task.specs, task_type="classification", outputs=10)
    model.fit(task.train)                # input statistics, tokenizers (training split only)
    out = model(task.train.batch(range(32)))
    out.logits, out.aux_losses, out.records

``model(batch, modalities=["audio"])`` predicts as if only those modalities were present,
for any non-empty subset; a sample left with no modality is a clear error.

``model(batch, task="t1")`` predicts for an earlier task of a model grown by ``add_task``:
with that task's head and its routing (``model.tasks``; the default is the last task).

``model(batch, token_masks={"image": hide})`` hides tokens (``hide``: bool [B, N]) behind a
learned mask token before fusion, for masked modelling; ``out.tokens`` (final token states)
and ``out.inputs`` (the encoders' outputs) give the predictions and their targets.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from modalmoe.config import ModelConfig
from modalmoe.data.batch import MultimodalBatch, MultimodalDataset
from modalmoe.encoders import Encoder, Tokens, encoders, sinusoidal_positions
from modalmoe.model.blocks import TrunkShape
from modalmoe.model.fusion import Fusion, fusions
from modalmoe.model.heads import EmbeddingHead, Head, TaskHeads
from modalmoe.model.missing import MissingBank, check_some_present, modality_dropout
from modalmoe.model.reduction import build_token_reduction
from modalmoe.moe.routers import routers
from modalmoe.moe.types import RoutingRecord

DEFAULT_ENCODER = {"text": "text_learned"}  # other kinds share the kind's name

#: A token mask: bool [B, N] (True: hide that token), or a function that draws one from the
#: modality's encoder output in this pass (useful when N is only known after encoding).
TokenMask = Tensor | Callable[[Tokens], Tensor]


@dataclass
class ModelOutput:
    """What the model returns.

    Attributes:
        logits: [B, C] (or [B] for one regression target); None without a prediction head.
        embeddings: modality -> [B, E] L2-normalised embeddings (0 where absent), or None.
        fused: [B, D] the representation the head reads (mean over the modalities present).
        pooled: [B, M, D] each modality's representation after fusion.
        present: [B, M] which modalities each sample had (after modality dropout, with bank
            tokens counting as present).
        aux_losses: name -> unweighted aux loss summed over MoE layers.
        records: one routing record per MoE layer, in execution order.
        tokens: per modality, in id order, its final token states ``x`` [B, N_m', D] and mask
            [B, N_m'] (bank tokens included, so N_m' >= N_m where the bank widens a stream:
            the extra columns are on the right).
        inputs: per modality, in id order, the encoders' outputs [B, N_m, D] before token
            masking, the bank and fusion (reconstruction targets; detach them for that).
        hidden: modality -> bool [B, N_m] the tokens hidden by ``token_masks`` (only real
            tokens), or None without ``token_masks``.
    """

    logits: Tensor | None
    fused: Tensor
    pooled: Tensor
    present: Tensor
    embeddings: dict[str, Tensor] | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    records: list[RoutingRecord] = field(default_factory=list)
    tokens: list[Tokens] | None = None
    inputs: list[Tokens] | None = None
    hidden: dict[str, Tensor] | None = None


class MultimodalModel(nn.Module):
    """Encoders, a fusion, heads and a missing-modality strategy, passed in built.

    Args:
        encoders: modality name -> encoder; the order fixes modality ids.
        fusion: a registered ``Fusion``.
        head: the prediction head, or None (embedding-only models).
        embedding_head: per-modality projections, or None.
        bank: a ``MissingBank`` (Flex-MoE), or None for the ``mask`` strategy.
        modality_dropout: drop probability per sample and modality in training.
        config: the ``ModelConfig`` it was built from (kept for saving and reports).
        task_heads: earlier task label -> its head, for a model grown by ``add_task``
            (``config.tasks``: their labels, then the current task's, whose head is ``head``).
    """

    def __init__(
        self,
        *,
        encoders: Mapping[str, Encoder],
        fusion: Fusion,
        head: Head | None,
        embedding_head: EmbeddingHead | None = None,
        bank: MissingBank | None = None,
        modality_dropout: float = 0.0,
        config: ModelConfig | None = None,
        task_heads: Mapping[str, Head] | None = None,
    ) -> None:
        super().__init__()
        if list(encoders) != list(fusion.modalities):
            raise ValueError(f"encoders {list(encoders)} and fusion modalities {list(fusion.modalities)} differ")
        if head is None and embedding_head is None:
            raise ValueError("a model needs a prediction head, an embedding head, or both")
        self.encoders = nn.ModuleDict(encoders)
        self.fusion, self.head, self.embedding_head, self.bank = fusion, head, embedding_head, bank
        self.modality_dropout = modality_dropout
        self.config = config
        self.task_heads = nn.ModuleDict(task_heads or {})
        names = [t.name for t in config.tasks] if config is not None else []
        if list(self.task_heads) != names[:-1]:
            raise ValueError(f"task heads {list(self.task_heads)} do not match the earlier tasks of {names}")
        # What a hidden token becomes (BERT's [MASK]; MAE inits it like this). Unused, and so
        # without a gradient, in passes without ``token_masks``.
        self.mask_token = nn.Parameter(torch.randn(fusion.dim) * 0.02)

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    @property
    def tasks(self) -> list[str]:
        """The task labels of a model grown by ``add_task``, in the order learned (the last is
        the current one); empty for a one-task model."""
        return [t.name for t in self.config.tasks] if self.config is not None else []

    @torch.no_grad()
    def fit(self, dataset: MultimodalDataset, modalities: Iterable[str] | None = None) -> MultimodalModel:
        """Fit the encoders' data-dependent state (input statistics, tokenizers) on the
        training split. Call once before training; never on validation or test data.
        ``modalities``: fit only these encoders (a modality added to a trained model)."""
        names = list(self.encoders) if modalities is None else list(modalities)
        for name in names:
            encoder = self.encoders[name]
            if name not in dataset.inputs:
                raise ValueError(f"the dataset has no modality {name!r} (it has {list(dataset.inputs)})")
            mask = None
            if name in dataset.lengths:
                length = dataset.inputs[name].shape[1]
                mask = torch.arange(length) < dataset.lengths[name].unsqueeze(1)
            encoder.fit(dataset.inputs[name], dataset.present[name], mask)
        return self

    def presence(self, batch: MultimodalBatch, modalities: Iterable[str] | None = None) -> Tensor:
        """[B, M] which modalities each sample carries, restricted to ``modalities``."""
        missing = [m for m in self.modalities if m not in batch.present]
        if missing:
            raise ValueError(f"the batch has no presence flags for {missing}; it carries {list(batch.present)}")
        keep = set(self.modalities if modalities is None else modalities)
        unknown = sorted(keep - set(self.modalities))
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; this model has {self.modalities}")
        return torch.stack([batch.present[m] & (m in keep) for m in self.modalities], 1).to(self._device)

    @property
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def tokens(self, batch: MultimodalBatch, present: Tensor) -> list[Tokens]:
        """Each modality's tokens; a modality no sample has gets zero-width tokens."""
        out = []
        size, dim, device = present.shape[0], self.fusion.dim, self._device
        for i, (name, encoder) in enumerate(self.encoders.items()):
            rows = present[:, i]
            if not bool(rows.any()):
                out.append(
                    Tokens(
                        torch.zeros(size, 0, dim, device=device), torch.zeros(size, 0, dtype=torch.bool, device=device)
                    )
                )
                continue
            if name not in batch.inputs:
                raise ValueError(f"batch marks modality {name!r} present for some samples but carries no input")
            out.append(encoder(batch.inputs[name], rows, batch.masks.get(name)))
        return out

    def hide(self, streams: list[Tokens], token_masks: Mapping[str, TokenMask]) -> tuple[list[Tokens], dict]:
        """Replace the tokens that ``token_masks`` marks by the mask token.

        A hidden token becomes ``mask_token`` plus its encoder's modality embedding plus a
        sinusoidal position of its index: as in BERT and MAE the mask token carries its
        position, or every hidden token of a sample would be the same input and get the same
        output. It stays a real token (mask True), so the trunk attends to and predicts it.

        Args:
            streams: the encoders' ``Tokens``, in modality order.
            token_masks: modality -> bool [B, N] (True: hide) or a function of that
                modality's ``Tokens`` returning one. Padding and absent samples are never hidden.

        Returns:
            the new streams and modality -> the bool [B, N] mask actually applied.
        """
        unknown = sorted(set(token_masks) - set(self.modalities))
        if unknown:
            raise ValueError(f"token_masks names unknown modalities {unknown}; this model has {self.modalities}")
        out, hidden = list(streams), {}
        for i, (name, encoder) in enumerate(self.encoders.items()):
            if name not in token_masks:
                continue
            s, hide = streams[i], token_masks[name]
            hide = hide(s) if callable(hide) else hide
            if not isinstance(hide, Tensor) or hide.dtype != torch.bool:
                raise TypeError(f"token_masks[{name!r}] must be a bool tensor [B, N], got {type(hide).__name__}")
            if hide.shape != s.mask.shape:
                raise ValueError(
                    f"token_masks[{name!r}] has shape {list(hide.shape)} but modality {name!r} has tokens of "
                    f"shape {list(s.mask.shape)} ([B, N]) in this batch"
                )
            hide = hide.to(s.mask.device) & s.mask
            n = s.x.shape[1]
            fill = self.mask_token + encoder.modality_embedding + sinusoidal_positions(n, self.fusion.dim, s.x.device)
            out[i] = Tokens(torch.where(hide.unsqueeze(-1), fill.to(s.x.dtype), s.x), s.mask)
            hidden[name] = hide
        return out, hidden

    def forward(
        self,
        batch: MultimodalBatch,
        *,
        modalities: Iterable[str] | None = None,
        token_masks: Mapping[str, TokenMask] | None = None,
        task: str | None = None,
    ) -> ModelOutput:
        """Predict for a batch.

        Args:
            batch: a ``MultimodalBatch`` on the model's device.
            modalities: use only these modalities (None: all the batch has).
            task: for a model grown by ``add_task``, the task to predict (its head and its
                routing); None: the current one (``tasks[-1]``).
            token_masks: modality -> bool [B, N_m] tokens to hide behind the mask token (or a
                function drawing that mask from the modality's ``Tokens``); see ``hide``.
        """
        present = self.presence(batch, modalities)
        check_some_present(present, self.modalities)
        if self.training and self.modality_dropout > 0:
            present = modality_dropout(present, self.modality_dropout)
        inputs = self.tokens(batch, present)
        streams, hidden = (inputs, None) if token_masks is None else self.hide(inputs, token_masks)
        if self.bank is not None:
            streams = self.bank(streams, present)
        head, index = self.task_head(task)
        task_ids = None
        if isinstance(head, TaskHeads):  # a task mixture: each sample says which task it is for
            task_ids = batch.meta.get("task")
            if task_ids is None:
                raise ValueError(
                    f"this model has one head per task ({head.names}): its batches need meta['task'], "
                    "each sample's task id (batches of a task mixture carry it)"
                )
        elif self.tasks:  # which task each sample is for, read by experts reserved by task
            first = streams[0].x
            current = len(self.tasks) - 1 if index is None else index
            task_ids = torch.full((first.shape[0],), current, dtype=torch.long, device=first.device)
        fused = self.fusion(streams, task=task_ids)
        weight = fused.present.to(fused.pooled.dtype).unsqueeze(-1)
        vector = (fused.pooled * weight).sum(1) / weight.sum(1).clamp_min(1.0)
        return ModelOutput(
            logits=None if head is None else head(vector, task_ids),
            fused=vector,
            pooled=fused.pooled,
            present=fused.present,
            embeddings=None if self.embedding_head is None else self.embedding_head(fused.pooled, fused.present),
            aux_losses=_with_encoder_losses(fused.aux_losses, inputs),
            records=fused.records,
            tokens=[Tokens(x, s.mask) for x, s in zip(fused.tokens, streams, strict=True)],
            inputs=inputs,
            hidden=hidden,
        )

    def task_head(self, task: str | None) -> tuple[Head | None, int | None]:
        """The head and routing task index of a pass for ``task`` (None for the current task)."""
        names = self.tasks
        if task is None or (names and task == names[-1]):
            return self.head, None
        if task not in names:
            known = f"its tasks are {names}" if names else "it learned one task (grow it with add_task)"
            raise ValueError(f"this model has no task {task!r}: {known}")
        return self.task_heads[task], names.index(task)


ONE_TASK = "task"
"""The task label a task-conditioned router of a one-task model is declared over."""


def moe_arguments(config: ModelConfig, modalities: list[str], *, tasks: list[str] | None = None) -> dict | None:
    """``build_moe_layer`` arguments from the config (None for a dense model).

    ``tasks``: the member labels of a task mixture (in task-id order), which experts reserved
    by task name; else the tasks of a model grown task by task (``config.tasks``)."""
    moe = config.moe
    if not moe.every:
        return None
    options = dict(moe.router_options)
    accepts = inspect.signature(routers.get(moe.router)).parameters
    if "modalities" in accepts and "modalities" not in options:
        options["modalities"] = tuple(modalities)
    task_names = tuple(tasks) if tasks else tuple(t.name for t in config.tasks)
    if "tasks" in accepts and "tasks" not in options:
        # A one-task model has one task: a task-conditioned router then routes as its
        # task-agnostic form (one gate), so its presets build on every task.
        options["tasks"] = task_names or (ONE_TASK,)
    reserved = {}
    if moe.reserved.modalities:
        reserved["modality"] = (tuple(modalities), moe.reserved.modalities)
    if moe.reserved.tasks:
        reserved["task"] = (task_names, moe.reserved.tasks)
    expert_hidden = moe.expert_hidden or max(1, config.hidden // (moe.k + moe.shared_experts))
    args = dict(
        num_experts=moe.num_experts,
        router=moe.router,
        k=moe.k,
        shared_experts=moe.shared_experts,
        capacity_factor=moe.capacity_factor,
        batch_priority=moe.batch_priority,
        entropy_threshold=moe.entropy_threshold,
        aux=tuple(moe.aux_losses),
        hidden=expert_hidden,
        communication=moe.communication,
        communication_dim=moe.communication_dim,
        router_options=options,
    )
    if reserved:
        args["reserved"] = reserved
    if moe.bank_experts is not None:
        args["bank_experts"] = moe.bank_experts
    return args


def build_model(
    config: ModelConfig,
    specs: Mapping,
    *,
    task_type: str = "classification",
    outputs: int | Mapping[str, int] | None = None,
) -> MultimodalModel:
    """Component builder: a ``MultimodalModel`` for a task's modalities.

    Args:
        config: the model config.
        specs: modality name -> ``ModalitySpec`` (``task.specs``).
        task_type: "classification" or "regression" (picks the head unless ``config.head.kind``).
        outputs: classes, labels or regression targets (None: 1, for regression); a mapping
            task label -> classes builds one head per task of a task mixture (``TaskHeads``;
            ``modalmoe.data.tasks.mixture``), whose samples carry their task id.
    """
    names = list(specs)
    if isinstance(outputs, Mapping) and config.tasks:
        raise ValueError(
            "a task mixture's model (one head per member task) cannot also be grown task by task "
            "(model.tasks); train the mixture with every task instead"
        )
    unknown = sorted(set(config.encoders) - set(names))
    if unknown:
        raise ValueError(f"config has encoders for {unknown}, which the task does not have (it has {names})")
    built = {}
    for name, spec in specs.items():
        choice = config.encoders.get(name)
        kind = (choice.name if choice and choice.name else None) or DEFAULT_ENCODER.get(spec.kind, spec.kind)
        built[name] = encoders.create(kind, spec=spec, dim=config.dim, **(choice.options if choice else {}))
    moe = moe_arguments(config, names, tasks=list(outputs) if isinstance(outputs, Mapping) else None)
    shape = TrunkShape(
        dim=config.dim,
        depth=config.depth,
        heads=config.heads,
        hidden=config.hidden,
        activation=config.activation,
        moe_every=config.moe.every,
        # Experts get their own width; dense blocks keep the config's hidden.
        moe=None if moe is None else {k: v for k, v in moe.items() if k != "hidden"},
        dropout=config.dropout,
        expert_hidden=None if moe is None else moe["hidden"],
    )
    extra = dict(config.fusion.options)
    reduction = build_token_reduction(config.token_reduction, names)
    if reduction is not None:  # early and late fusion hand it to their trunks
        extra["reduction"] = reduction
    fusion = fusions.create(config.fusion.name, modalities=names, shape=shape, **extra)
    kind = config.head.kind or ("classification" if task_type == "classification" else "regression")
    if isinstance(outputs, Mapping):
        if kind != "classification":
            raise ValueError(f"one head per task is for classification mixtures, not a {kind} head")
        head = TaskHeads(dim=config.dim, tasks=dict(outputs))
    elif outputs is None:
        if kind != "regression":
            raise ValueError(f"a {kind} head needs `outputs` (the number of classes or labels)")
        outputs = 1
    if not isinstance(outputs, Mapping):
        head = Head(kind=kind, dim=config.dim, outputs=outputs)
    if config.tasks and (config.tasks[-1].kind, config.tasks[-1].outputs) != (kind, outputs):
        current = config.tasks[-1]
        raise ValueError(
            f"model.tasks says the current task {current.name!r} has a {current.kind} head with {current.outputs} "
            f"outputs, but its data needs a {kind} head with {outputs}"
        )
    model = MultimodalModel(
        encoders=built,
        fusion=fusion,
        head=head,
        embedding_head=None
        if config.head.embed_dim is None
        else EmbeddingHead(modalities=names, dim=config.dim, embed_dim=config.head.embed_dim),
        bank=None
        if config.missing.strategy == "mask"
        else MissingBank(num_modalities=len(names), dim=config.dim, tokens=config.missing.bank_tokens),
        modality_dropout=config.missing.dropout,
        config=config,
        task_heads={t.name: Head(kind=t.kind, dim=config.dim, outputs=t.outputs) for t in config.tasks[:-1]},
    )
    return model


def _with_encoder_losses(aux_losses: dict[str, Tensor], streams: list[Tokens]) -> dict[str, Tensor]:
    """The trunk's aux losses plus those of MoE layers inside encoders (``Tokens.aux_losses``)."""
    if not any(s.aux_losses for s in streams):
        return aux_losses
    total = dict(aux_losses)
    for stream in streams:
        for name, value in stream.aux_losses.items():
            total[name] = total[name] + value if name in total else value
    return total
