"""Configuration: pydantic v2 models for every part, loaded from YAML, overridable from the CLI.

A model is described by a ``ModelConfig``; an experiment (a task plus a model) by an
``ExperimentConfig``. Unknown keys are errors that name the key and the closest valid ones,
so a typo (``moe.num_expert``) never silently falls back to a default.

    cfg = load_config("configs/tasks/av-digits.yaml", overrides=["model.moe.num_experts=16"])
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from modalmoe import registry


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what is wrong and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EncoderConfig(_Strict):
    """One modality's encoder.

    Attributes:
        name: registered encoder name (``image``, ``sequence``, ``tabular``, ``text_learned``,
            ``text_minilm``, ``vector``); None picks the one for the modality's kind.
        options: the encoder's own arguments (``patch``, ``tokens``, ``vocab_size``, ...).
    """

    name: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class ReservedExperts(_Strict):
    """Experts only one modality or one task may use (``modalmoe.moe.masks``): closed to
    every other modality (task), so their routing is what it was before the experts existed.
    Lifelong growth sets them (``modalmoe.lifelong``); experts nobody reserved are open to all.

    Attributes:
        modalities: modality name -> expert ids.
        tasks: task label (``model.tasks``) -> expert ids.
    """

    modalities: dict[str, list[int]] = Field(default_factory=dict)
    tasks: dict[str, list[int]] = Field(default_factory=dict)


class MoEConfig(_Strict):
    """Where the MoE layers are and how they route.

    Attributes:
        every: 0 for a dense model; 1 puts an MoE FFN in every block, 2 in every other one.
        num_experts: E routed experts per MoE layer.
        router: a registered router name.
        k: experts per token (for expert choice, set it to the capacity factor: the average
            experts per token).
        expert_hidden: each expert's width; None means ``hidden // (k + shared_experts)``,
            so a token's active expert FLOPs equal the dense FFN's.
        shared_experts: always-on experts (DeepSeek-MoE), each as wide as a routed one.
        capacity_factor: None for dropless dispatch.
        batch_priority: under a capacity limit, drop the lowest-priority tokens' assignments
            (by top gate weight, V-MoE's batch-prioritised routing) instead of the last ones.
        communication: how a token's k expert outputs interact before they are summed
            (``none``, ``dense``, ``star``; see ``modalmoe.moe.communication``).
        communication_dim: width of the communication's projections (None: its default).
        entropy_threshold: LIMoE's global-entropy threshold (None: no global entropy loss).
        aux_losses: which router losses the MoE layers compute (``load_balance``,
            ``sequence_balance`` (DeepSeek-V3's per-sample balance), ``z_loss``,
            ``local_entropy``, ``global_entropy``); the trainer weights them. LIMoE's entropy
            losses are opt-in: they cost time every step.
        router_options: the router's own arguments (``gating``, ``groups``, ``slots_per_expert``, ...).
            Modality-aware routers get the task's modality names automatically.
        bank_experts: experts in each bank when fewer than ``num_experts`` (a model whose
            experts were merged after training, ``modalmoe compress --method merge-experts``:
            the router scores ``num_experts`` and a per-layer map in the checkpoint sends each
            to its merged expert). None: ``num_experts``.
        reserved: experts only one modality or task may use (``ReservedExperts``); the
            router must accept an expert mask (token_choice, expert_choice, per_modality).
    """

    every: int = Field(0, ge=0)
    num_experts: int = Field(8, ge=1)
    router: str = "token_choice"
    k: int = Field(2, ge=1)
    expert_hidden: int | None = Field(None, ge=1)
    shared_experts: int = Field(0, ge=0)
    capacity_factor: float | None = None
    batch_priority: bool = False
    communication: str = "none"
    communication_dim: int | None = None
    entropy_threshold: float | None = None
    aux_losses: list[Literal["load_balance", "sequence_balance", "z_loss", "local_entropy", "global_entropy"]] = Field(
        default_factory=lambda: ["load_balance", "z_loss"]
    )
    router_options: dict[str, Any] = Field(default_factory=dict)
    bank_experts: int | None = Field(None, ge=1)
    reserved: ReservedExperts = Field(default_factory=ReservedExperts)

    @field_validator("router")
    @classmethod
    def _known_router(cls, name: str) -> str:
        known = registry.family("router")  # registered by modalmoe.moe (the package imports it)
        if known is not None and name not in known:
            close = difflib.get_close_matches(name, known.names(), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown router {name!r}{hint} (known: {', '.join(known.names())})")
        return name

    @model_validator(mode="after")
    def _reserved_routable(self) -> MoEConfig:
        known = registry.family("router")
        if (self.reserved.modalities or self.reserved.tasks) and known is not None and self.router in known:
            if not getattr(known.get(self.router), "accepts_mask", False):
                accepting = [n for n in known.names() if getattr(known.get(n), "accepts_mask", False)]
                raise ValueError(
                    f"model.moe.reserved needs a router that takes an expert mask ({', '.join(accepting)}); "
                    f"{self.router!r} does not"
                )
        return self

    @model_validator(mode="after")
    def _k_fits(self) -> MoEConfig:
        if self.k > self.num_experts:
            raise ValueError(f"k={self.k} is larger than num_experts={self.num_experts}")
        if self.bank_experts is not None and self.bank_experts > self.num_experts:
            raise ValueError(f"bank_experts={self.bank_experts} is larger than num_experts={self.num_experts}")
        return self


class FusionConfig(_Strict):
    """How modality streams meet (``modalmoe.model.fusion``).

    Attributes:
        name: a registered fusion (``early``, ``late``, ``bottleneck``, ``cross``, or one you
            register with ``@fusions.register``); checked when the model is built.
        options: the fusion's own arguments (``bottleneck``: ``bottleneck_tokens``, the fusion
            tokens shared between streams, 4 by default as in MBT).
    """

    name: str = "early"
    options: dict[str, Any] = Field(default_factory=dict)


class MissingConfig(_Strict):
    """What an absent modality becomes.

    Attributes:
        strategy: ``mask`` (it contributes no tokens) or ``bank`` (Flex-MoE: learned tokens per
            missing modality, conditioned on which modalities are present).
        bank_tokens: tokens the bank adds per missing modality.
        dropout: modality dropout probability per sample and modality during training
            (at least one modality is always kept); 0 disables it.
    """

    strategy: Literal["mask", "bank"] = "mask"
    bank_tokens: int = Field(1, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class HeadConfig(_Strict):
    """The output.

    Attributes:
        kind: ``classification``, ``multilabel``, ``regression``; None follows the task.
        embed_dim: width of the per-modality embedding projections (contrastive training and
            retrieval); None for no embedding head.
    """

    kind: Literal["classification", "multilabel", "regression"] | None = None
    embed_dim: int | None = Field(None, ge=1)


class TaskHeadConfig(_Strict):
    """One task of a model that learned a sequence of tasks (``modalmoe.lifelong``).

    Attributes:
        name: the task's label (``--add-task LABEL``), unique in the model.
        kind: its head's kind.
        outputs: its classes, labels or regression targets.
        data: the bundled task whose data it learned (``modalmoe eval RUN --task LABEL``
            evaluates it there); None when unknown (a model grown in memory).
        data_options: that task's options.
    """

    name: str = Field(min_length=1)
    kind: Literal["classification", "multilabel", "regression"] = "classification"
    outputs: int = Field(ge=1)
    data: str | None = None
    data_options: dict[str, Any] = Field(default_factory=dict)


class TokenReductionConfig(_Strict):
    """Token reduction for long modalities (``modalmoe.efficiency.tokens``): after chosen
    trunk blocks, each modality keeps a fraction of its tokens, so later blocks run on fewer.

    Attributes:
        method: ``none``; ``merge`` (ToMe bipartite soft matching, training-free);
            ``attention`` (keep the tokens that receive the most attention); ``router`` (keep
            the tokens whose router is most confident; MoE blocks only).
        layers: 0-based blocks after which tokens are reduced (``[0]``: blocks 1.. run on
            fewer tokens); -1 means before the first block (``merge`` only).
        keep: fraction of each modality's real tokens kept at each reducing layer, in (0, 1]
            (``ceil(keep * n)``, at least 1 per present modality); or modality name ->
            fraction, where unnamed modalities keep all their tokens.
        proportional_attention: ``merge``: add ``log(size)`` to later blocks' attention
            logits, so a merged token weighs as much as the tokens it stands for (ToMe).
        metric: ``merge``: similarity on the block's attention ``keys`` (mean over heads;
            ToMe) or on its output ``tokens`` (before the first block it is always the tokens).
        placement: ``after_block`` (between blocks) or ``before_ffn`` (ToMe's own placement:
            inside block ``layer``, after its attention and before its FFN, so that FFN runs
            on fewer tokens too; ``merge`` and ``attention`` only).
    """

    method: Literal["none", "merge", "attention", "router"] = "none"
    layers: list[int] = Field(default_factory=lambda: [0])
    keep: float | dict[str, float] = 0.5
    proportional_attention: bool = True
    metric: Literal["keys", "tokens"] = "keys"
    placement: Literal["after_block", "before_ffn"] = "after_block"

    @field_validator("keep")
    @classmethod
    def _fractions(cls, keep: float | dict[str, float]) -> float | dict[str, float]:
        values = keep.values() if isinstance(keep, dict) else [keep]
        bad = [v for v in values if not 0.0 < v <= 1.0]
        if bad:
            raise ValueError(f"keep fractions must be in (0, 1] (1.0 keeps every token), got {bad}")
        return keep

    @field_validator("layers")
    @classmethod
    def _layers(cls, layers: list[int]) -> list[int]:
        bad = [layer for layer in layers if layer < -1]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(
                f"layers must be distinct block indices >= 0 (after that block) or -1 (before the first "
                f"block), got {layers}"
            )
        return sorted(layers)

    @model_validator(mode="after")
    def _before_first_block(self) -> TokenReductionConfig:
        if self.placement == "before_ffn" and self.method == "router":
            raise ValueError(
                "placement 'before_ffn' reduces before the block's MoE layer has routed, so there is no router "
                "score yet: use placement 'after_block' with method 'router', or 'merge'/'attention'"
            )
        if -1 in self.layers and self.method in ("attention", "router"):
            raise ValueError(
                f"layer -1 (before the first block) works only with method 'merge': {self.method!r} scores "
                "come from a block; use layers >= 0"
            )
        return self


class QuantizationConfig(_Strict):
    """Post-training quantization the model's weights have (``modalmoe.efficiency.quantize``).

    Set by ``modalmoe compress RUN_DIR --method int8`` (or ``quantize_int8``), not for
    training: it tells the run loader (``RunDir.load_model``) to give the model the int8 structure a quantized
    checkpoint loads into.

    Attributes:
        method: ``none`` or ``int8`` (int8 weights with a scale per output channel, per
            expert for expert banks; activations quantized per row at run time).
        min_weight: layers whose weight has fewer elements stay in float32.
        patch_convs: also quantize non-overlapping patch convolutions (image and audio
            patchify). Off by default: measured slower in int8 than mkldnn's float conv
            (``benchmarks/quantization.py --layers``).
    """

    method: Literal["none", "int8"] = "none"
    min_weight: int = Field(8192, ge=0)
    patch_convs: bool = False


class ModelConfig(_Strict):
    """A multimodal model: encoders, fusion, trunk, MoE, missing-modality strategy, head.

    Attributes:
        dim: token width D.
        depth: transformer blocks (per stream for ``late``, ``bottleneck`` and ``cross``).
        heads: attention heads.
        hidden: FFN width; each expert's width in MoE blocks.
        activation: ``gelu`` or ``swiglu``.
        dropout: attention and residual dropout.
        token_reduction: fewer tokens after chosen blocks (``TokenReductionConfig``); left
            out of dumps while ``method`` is ``none``, so configs and checkpoints written
            before it existed still match.
        quantization: the weights' post-training quantization (``QuantizationConfig``);
            omitted from dumps while ``none``, like ``token_reduction``.
        tasks: the tasks of a model grown by ``add_task`` (``modalmoe.lifelong.tasks``), in the
            order learned; the last is the one trained now (``head``), the earlier ones keep
            their heads in ``task_heads``. Empty (and left out of dumps) for a one-task model.
    """

    dim: int = Field(64, ge=1)
    depth: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    hidden: int = Field(128, ge=1)
    activation: Literal["gelu", "swiglu"] = "gelu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    encoders: dict[str, EncoderConfig] = Field(default_factory=dict)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    missing: MissingConfig = Field(default_factory=MissingConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    token_reduction: TokenReductionConfig = Field(default_factory=TokenReductionConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    tasks: list[TaskHeadConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _task_names_unique(self) -> ModelConfig:
        names = [t.name for t in self.tasks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"model.tasks names {twice} more than once; each task needs its own label")
        if len(self.tasks) == 1:
            raise ValueError("model.tasks lists one task; it lists every task of a grown model (two or more) or none")
        return self

    @model_validator(mode="after")
    def _present_set_router_needs_mask(self) -> ModelConfig:
        known = registry.family("router")
        router = known.get(self.moe.router) if known is not None and self.moe.router in known else None
        if self.moe.every and self.missing.strategy == "bank" and getattr(router, "reads_present_set", False):
            raise ValueError(
                f"router {self.moe.router!r} routes by the modalities each sample has, but missing.strategy 'bank' "
                "gives absent modalities tokens, so every sample would look complete; use missing.strategy 'mask'"
            )
        return self

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be a multiple of heads={self.heads}")
        return self

    @model_validator(mode="after")
    def _token_reduction_fits(self) -> ModelConfig:
        reduction = self.token_reduction
        if reduction.method == "none":
            return self
        if self.fusion.name not in ("early", "late"):
            raise ValueError(
                f"token_reduction works with fusion 'early' or 'late', not {self.fusion.name!r} (bottleneck and "
                "cross fusion exchange tokens between streams position by position); set token_reduction.method: none"
            )
        bad = [layer for layer in reduction.layers if layer >= self.depth]
        if bad:
            raise ValueError(
                f"token_reduction.layers {bad} out of range for depth={self.depth}: use 0..{self.depth - 1} "
                "(after that block) or -1 (before the first block)"
            )
        if reduction.method == "router":
            every = self.moe.every
            dense = [layer for layer in reduction.layers if not every or (layer + 1) % every]
            if dense:
                raise ValueError(
                    f"token_reduction.method 'router' needs MoE blocks, but blocks {dense} are dense "
                    f"(moe.every={every}); use 'attention' or 'merge', or layers whose block has an MoE FFN"
                )
        return self


class ObjectiveConfig(_Strict):
    """One training objective (``modalmoe.objectives``).

    Attributes:
        name: a registered objective (``cross_entropy``, ``bce``, ``mse``, ``infonce``,
            ``matching``, ``masked``, ``distill``).
        weight: its weight in the total loss.
        options: its own arguments (``label_smoothing``, ``pairs``, ``modality``, ``ratio``, ...).
    """

    name: str
    weight: float = Field(1.0, ge=0.0)
    options: dict[str, Any] = Field(default_factory=dict)


class EarlyStoppingConfig(_Strict):
    """Stop when the validation metric has not improved for ``patience`` evaluations.

    Attributes:
        metric: a validation metric (``accuracy``, ``macro_f1``, ``auroc``, ``ece``, ``nll``;
            ``mse``, ``mae``, ``r2`` for regression); None: the head's primary metric
            (accuracy, macro-F1 for multi-label, MSE for regression).
        mode: ``max`` or ``min``; None: the primary metric's, or ``min`` for ece/nll/mse/mae.
        patience: evaluations without improvement before stopping; 0 never stops early.
    """

    metric: str | None = None
    mode: Literal["max", "min"] | None = None
    patience: int = Field(8, ge=0)


class OGMConfig(_Strict):
    """On-the-fly gradient modulation with generalisation enhancement (OGM-GE, Peng et al. 2022).

    Attributes:
        enabled: modulate the encoders' gradients by how dominant each modality is.
        alpha: modulation strength.
        noise: add the Gaussian "generalisation enhancement" noise to modulated gradients.
    """

    enabled: bool = False
    alpha: float = Field(0.5, ge=0.0)
    noise: bool = True


class CollapseConfig(_Strict):
    """Router collapse alarm: warn when, for ``patience`` steps in a row, one expert receives
    more than ``max_share`` of a layer's tokens or the mean normalised router entropy is below
    ``min_entropy``.

    Attributes:
        enabled: watch every MoE layer during training.
        max_share: the largest share of a layer's tokens one expert may receive.
        min_entropy: the smallest mean router entropy, as a fraction of log E.
        patience: consecutive steps in alarm before warning.
    """

    enabled: bool = True
    max_share: float = Field(0.8, gt=0.0, le=1.0)
    min_entropy: float = Field(0.2, ge=0.0, le=1.0)
    patience: int = Field(20, ge=1)


class LoRAConfig(_Strict):
    """Low-rank adaptation (LoRA, Hu et al. 2021): train small adapters on a frozen base
    (``modalmoe.model.lora``); usually with ``train.init_from`` a trained run.

    Attributes:
        rank: adapter rank r; 0 turns LoRA off (every parameter trains as usual).
        alpha: the adapters' output is scaled by ``alpha / rank``.
        dropout: dropout on the adapted modules' inputs (``nn.Linear``/conv adapters only;
            expert adapters change the weights, not the inputs).
        targets: ``nn.Linear`` (and ``Conv1d``/``Conv2d``) modules to adapt, by name or dotted
            name suffix: ``qkv``, ``out`` (attention), ``q``, ``kv`` (cross-attention),
            ``w_in``, ``w_out`` (dense FFNs and shared experts), ``proj``, ``patchify``
            (encoders' projections). Heads are never adapted (see ``train_heads``).
        experts: adapt the stacked expert weights of every MoE layer (per-expert factors).
        train_heads: keep the prediction and embedding heads fully trainable (needed when the
            head is new, for a new task); False freezes them too.
    """

    rank: int = Field(0, ge=0)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: ["qkv", "out", "q", "kv", "w_in", "w_out"])
    experts: bool = True
    train_heads: bool = True


class GrowConfig(_Strict):
    """Continue a run with a new modality or a new task and more experts
    (``modalmoe.lifelong``): set by ``modalmoe train --continue-from RUN --add-modality NAME``
    (``lifelong.grow_config``) or ``--add-task LABEL`` (``lifelong.grow_task_config``),
    together with ``train.init_from`` (the run) and the grown ``model``.

    Attributes:
        modalities: the modalities added to the run's (appended to ``modalities``).
        task: the label of the task added (``model.tasks``' last entry): the run's task
            becomes an earlier one with its own head, this run trains a new head on the
            experiment's ``task``. One of ``modalities`` and ``task`` is set.
        experts: experts added per MoE layer for each added modality or the added task,
            reserved for it (``model.moe.reserved``); 0 adds none.
        freeze: what of the run stays fixed: ``experts`` (the run's experts, shared experts
            and router rows), ``old`` (every tensor that came from the run; grown tensors keep
            their old slices), ``none`` (naive fine-tuning). Earlier tasks' heads are never
            used by the new task's loss, and always stay fixed.
        ewc: Elastic Weight Consolidation strength lambda (Kirkpatrick et al. 2017): adds
            ``lambda / 2 * sum F (theta - theta*)^2`` over the run's tensors, with the diagonal
            Fisher F from the run's own task and modalities; 0 turns it off.
        fisher_samples: training samples of the run's task the Fisher is averaged over.
    """

    modalities: list[str] = Field(default_factory=list)
    task: str | None = Field(None, min_length=1)
    experts: int = Field(0, ge=0)
    freeze: Literal["experts", "old", "none"] = "experts"
    ewc: float = Field(0.0, ge=0.0)
    fisher_samples: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _one_addition(self) -> GrowConfig:
        if bool(self.modalities) == (self.task is not None):
            raise ValueError(
                "train.grow adds either modalities or one task: set train.grow.modalities or train.grow.task"
                + (", not both" if self.modalities else "")
            )
        return self


class UpcycleConfig(_Strict):
    """Sparse upcycling (Komatsuzaki et al. 2023): fill this run's MoE layers with copies of the
    FFNs of the dense run in ``train.init_from`` (``modalmoe.model.upcycle``); set by
    ``modalmoe train --upcycle-from RUN``.

    Attributes:
        router_init: ``tied`` (a fresh router; with fine-grained experts, the rows of each copy
            of the FFN tied so that top-k takes whole copies) or ``zero`` (uniform routing).
        noise: multiplicative noise on the expert copies (0: exact copies, so the model starts
            by computing exactly what the dense model did).
        shared_fraction: the share of the FFN's output the shared experts take (None: their
            share of the active hidden units).
    """

    router_init: Literal["tied", "zero"] = "tied"
    noise: float = Field(0.0, ge=0.0)
    shared_fraction: float | None = Field(None, ge=0.0, le=1.0)


class SamplerConfig(_Strict):
    """Which samples each epoch visits (``modalmoe.train.samplers``): how the epoch's draws are
    shared among the tasks of a task mixture.

    Attributes:
        name: ``proportional`` (every sample once, the default), ``uniform`` (each task the same
            share) or ``temperature`` (task shares proportional to ``n ** (1 / temperature)``).
        options: the sampler's own arguments (``temperature``).
    """

    name: str = "proportional"
    options: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Strict):
    """How to train.

    Attributes:
        epochs: passes over the training split.
        batch_size: samples per optimisation step (per micro-batch with ``accumulate``).
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup: fraction of all steps with linear warmup; then cosine decay to ``min_lr_ratio * lr``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        clip_norm: gradient clipping max norm (None: no clipping).
        accumulate: micro-batches per optimiser step.
        seed: seeds the model init, data order, dropout and every random draw.
        objectives: weighted objectives; empty means the head's supervised loss
            (cross-entropy, BCE or MSE).
        aux_weights: weight of each MoE aux loss; each must be in ``model.moe.aux_losses``.
        early_stopping: on a validation metric, or None.
        eval_every: evaluate on the validation split every this many epochs.
        checkpoint_every: also checkpoint every this many optimiser steps (None: per epoch only).
        ogm: OGM-GE for modality imbalance.
        collapse: the router collapse alarm.
        init_from: a run directory whose best checkpoint initialises the model before
            training (tensors whose names and shapes match; the rest, e.g. a head for another
            number of classes, keep their fresh init and are reported); None: a fresh model.
        lora: low-rank adapters on a frozen base (``rank: 0``: off).
        grow: this run continues ``init_from`` with added modalities and experts
            (``GrowConfig``); None: a plain run. Omitted from dumps while None.
        upcycle: this MoE run starts from the dense run ``init_from`` by sparse upcycling
            (``UpcycleConfig``); None: no upcycling.
        sampler: the order of each epoch's samples (``SamplerConfig``; for a task mixture,
            how often each task is drawn).
    """

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    warmup: float = Field(0.05, ge=0.0, lt=1.0)
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0)
    clip_norm: float | None = Field(1.0, gt=0.0)
    accumulate: int = Field(1, ge=1)
    seed: int = 0
    objectives: list[ObjectiveConfig] = Field(default_factory=list)
    aux_weights: dict[str, float] = Field(default_factory=lambda: {"load_balance": 0.01, "z_loss": 0.001})
    early_stopping: EarlyStoppingConfig | None = Field(default_factory=EarlyStoppingConfig)
    eval_every: int = Field(1, ge=1)
    checkpoint_every: int | None = Field(None, ge=1)
    ogm: OGMConfig = Field(default_factory=OGMConfig)
    collapse: CollapseConfig = Field(default_factory=CollapseConfig)
    init_from: str | None = None
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    grow: GrowConfig | None = None
    upcycle: UpcycleConfig | None = None
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)

    @model_validator(mode="after")
    def _grow_needs_a_run(self) -> TrainConfig:
        if self.upcycle is not None and self.init_from is None:
            raise ValueError("train.upcycle starts from a dense run: set train.init_from to its directory")
        if self.upcycle is not None and self.grow is not None:
            raise ValueError("train.upcycle and train.grow both transform train.init_from: set one")
        if self.grow is not None and self.init_from is None:
            raise ValueError("train.grow continues a run: set train.init_from to its directory (or --continue-from)")
        if self.grow is not None and self.lora.rank:
            raise ValueError("train.grow does not combine with train.lora; set train.lora.rank=0")
        return self


class DistributedConfig(_Strict):
    """How a run launched by torchrun splits its work (``modalmoe.train.distributed``); a
    single process ignores it unless ``expert_parallel_size > 1``, which needs torchrun.

    Kept apart from ``train``: a checkpoint resumes or loads at any world size and expert-parallel
    size, so changing these does not make it "a different run".

    Attributes:
        expert_parallel_size: P, the ranks that share one copy of the experts; rank r of each
            group of P consecutive ranks holds experts ``[r*E/P, (r+1)*E/P)`` and tokens reach
            them by all-to-all. 1: every rank holds every expert (plain data parallel). Must
            divide ``model.moe.num_experts`` and the number of processes.
        backend: ``gloo`` or ``nccl`` (CUDA tensors over nccl, CPU ones over gloo); None picks
            nccl when CUDA is available, else gloo.
    """

    expert_parallel_size: int = Field(1, ge=1)
    backend: Literal["gloo", "nccl"] | None = None


#: The config schema's version. A config without ``version`` is version 1 (written before
#: versions existed); ``migrate`` brings an older one up to date when it is loaded, so old
#: runs and checkpoints load and compare as current configs. Add a step to ``MIGRATIONS``
#: only when a key moves or changes meaning; a new key with a default needs none (a missing
#: key takes its default on load).
CONFIG_VERSION = 3


def _v1_to_v2(data: dict) -> dict:
    """Reserved experts moved out of the router's options into ``model.moe.reserved`` (any
    router that takes an expert mask can use them); expert choice's ``capacity_factor`` option
    became ``experts_per_token``."""
    moe = (data.get("model") or {}).get("moe")
    if not isinstance(moe, dict) or not isinstance(moe.get("router_options"), dict):
        return data
    options = moe["router_options"]
    reserved = dict(moe.get("reserved") or {})
    for old, new in (("reserved", "modalities"), ("reserved_tasks", "tasks")):
        if old in options:
            reserved[new] = options.pop(old)
    options.pop("tasks", None)  # token_choice's task names: the model passes them to the mask
    if moe.get("router", "token_choice") == "token_choice":
        options.pop("modalities", None)
    if reserved:
        moe["reserved"] = reserved
    if moe.get("router") == "expert_choice" and "capacity_factor" in options and "experts_per_token" not in options:
        options["experts_per_token"] = options.pop("capacity_factor")
    return data


def _v2_to_v3(data: dict) -> dict:
    """``model.fusion.bottleneck_tokens`` became the bottleneck fusion's option
    (``model.fusion.options``), so that any registered fusion takes its own options."""
    fusion = (data.get("model") or {}).get("fusion")
    if not isinstance(fusion, dict) or "bottleneck_tokens" not in fusion:
        return data
    tokens = fusion.pop("bottleneck_tokens")
    if fusion.get("name") == "bottleneck":
        fusion["options"] = {"bottleneck_tokens": tokens, **(fusion.get("options") or {})}
    return data


MIGRATIONS = {1: _v1_to_v2, 2: _v2_to_v3}  # version v -> the step from v to v + 1


def migrate(data: Mapping) -> dict:
    """A copy of a raw experiment config brought up to ``CONFIG_VERSION``."""
    data = copy.deepcopy(dict(data))
    version = data.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"version must be a positive integer (the config schema's version), got {version!r}")
    if version > CONFIG_VERSION:
        raise ValueError(
            f"this config has version {version}, newer than this modalmoe's {CONFIG_VERSION}; upgrade modalmoe"
        )
    while version < CONFIG_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
    data["version"] = version
    return data


class ExperimentConfig(_Strict):
    """A task, a model and how to train it.

    Attributes:
        version: the config schema's version (``CONFIG_VERSION``; older configs are migrated
            on load, see ``migrate``).
        name: the preset name (informational).
        description: one line about the design.
        task: a bundled task name (``modalmoe data list``) or a data directory's path (a
            manifest directory or a MultiBench layout; ``{path: DIR}`` also works).
        task_options: the task's own options (synthetic tasks take sizes and noise).
        modalities: train on only these modalities of the task (None: all); e.g. the
            unimodal reference a missing-modality model is compared with.
        model: the model.
        train: the training recipe.
        distributed: data and expert parallelism under torchrun.
    """

    version: int = CONFIG_VERSION
    name: str = ""
    description: str = ""
    task: str
    task_options: dict[str, Any] = Field(default_factory=dict)
    modalities: list[str] | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        data = migrate(data) if isinstance(data, Mapping) else data
        task = data.get("task") if isinstance(data, dict) else None
        if isinstance(task, Mapping):  # task: {path: DIR, <loader options>}
            if "path" not in task:
                raise ValueError(f"task: a mapping names a data directory as {{path: DIR}}, got keys {sorted(task)}")
            options = {k: v for k, v in task.items() if k != "path"}
            data["task"] = str(task["path"])
            data["task_options"] = {**options, **(data.get("task_options") or {})}
        return data

    @model_validator(mode="after")
    def _experts_split(self) -> ExperimentConfig:
        size, moe = self.distributed.expert_parallel_size, self.model.moe
        if size > 1 and not moe.every:
            raise ValueError(
                f"distributed.expert_parallel_size={size} needs MoE layers to shard; set model.moe.every >= 1 "
                "or distributed.expert_parallel_size=1"
            )
        if moe.num_experts % size:
            raise ValueError(
                f"model.moe.num_experts={moe.num_experts} is not divisible by distributed.expert_parallel_size="
                f"{size}; every rank must hold the same number of experts"
            )
        return self

    @field_validator("modalities")
    @classmethod
    def _some_modalities(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("an empty list trains on no modality; name at least one, or leave it out (null) for all")
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"{value} names a modality twice")
        return value

    @model_validator(mode="after")
    def _only_selected_encoders(self) -> ExperimentConfig:
        # A preset configures every modality's encoder; training on a subset drops the others.
        if self.modalities:
            kept = {k: v for k, v in self.model.encoders.items() if k in self.modalities}
            if kept != self.model.encoders:
                self.model.encoders = kept
        return self

    @model_validator(mode="after")
    def _aux_losses_computed(self) -> ExperimentConfig:
        if not self.model.moe.every:
            return self
        known = registry.family("router")
        router = known.get(self.model.moe.router) if known is not None and self.model.moe.router in known else None
        own = tuple(getattr(router, "losses", ()))  # losses the router computes itself (noisy top-k's load)
        computed = [*self.model.moe.aux_losses, *own]
        missing = [n for n, w in self.train.aux_weights.items() if w and n not in computed]
        if missing:
            raise ValueError(
                f"train.aux_weights weights {missing}, which the MoE layers do not compute; add them to "
                f"model.moe.aux_losses (now {self.model.moe.aux_losses}"
                + (f"; the {self.model.moe.router} router adds {list(own)}" if own else "")
                + ") or set their weight to 0"
            )
        return self


# --- loading, overrides, errors -------------------------------------------------------------


def deep_merge(base: Mapping, update: Mapping) -> dict:
    """A copy of ``base`` with ``update`` merged in, recursing into nested mappings."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.moe.num_experts=16"`` -> (["model", "moe", "num_experts"], 16); the value is YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key.path=value, e.g. model.moe.num_experts=16")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({err})") from None
    return [part for part in key.strip().split(".")], parsed


def apply_overrides(data: Mapping, overrides: Iterable[str]) -> dict:
    """Set each ``key.path=value`` in a copy of the raw config mapping."""
    out = copy.deepcopy(dict(data))
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value ({child!r}), not a section")
            node = child
        node[path[-1]] = value
    return out


def _model_type(annotation) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``X``, ``X | None``), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _fields_at(schema: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid where the last item of ``loc`` (a pydantic error location) sits."""
    current: type[BaseModel] | None = schema
    parts = list(loc[:-1])
    while parts and current is not None:
        field = current.model_fields.get(parts.pop(0))
        if field is None:
            return []
        annotation = field.annotation
        if getattr(annotation, "__origin__", None) is dict:  # dict[str, X]: skip the free key
            if not parts:
                return []
            parts.pop(0)
            annotation = annotation.__args__[-1]
        current = _model_type(annotation)
    return list(current.model_fields) if current is not None else []


def _explain(err: ValidationError, schema: type[BaseModel], source: str) -> ConfigError:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _fields_at(schema, loc)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            lines.append(f"unknown key {where!r}{hint} (valid here: {', '.join(valid)})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {msg} (got {e.get('input')!r})")
    return ConfigError(f"invalid config {source}:\n  " + "\n  ".join(lines))


def validate(data: Mapping, schema: type[BaseModel] = ExperimentConfig, *, source: str = "") -> BaseModel:
    """Validate a raw mapping; errors name each bad key and the closest valid ones."""
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise _explain(err, schema, source or f"for {schema.__name__}") from None


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from ``path``, with clear errors for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "save it as UTF-8, or check that it is the YAML file you meant"
        ) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path, *, overrides: Iterable[str] = (), schema: type[BaseModel] = ExperimentConfig
) -> BaseModel:
    """Read a YAML config, apply ``--set`` style overrides, validate."""
    return validate(apply_overrides(read_yaml(path), overrides), schema, source=f"in {str(path)!r}")


def to_yaml(config: BaseModel) -> str:
    """The config as YAML (round-trips through ``validate``)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
