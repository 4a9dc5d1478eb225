"""A new router, encoder, fusion or trainer callback is one new file plus its registration.

Each part below is written outside the package, as a user's own file would be, registered
with its room's registry, named in a config and trained end to end by the unchanged core
(``build_model``, ``Trainer``): nothing else is edited. The fixture unregisters them again.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor, nn

from modalmoe.config import validate
from modalmoe.encoders.base import Encoder, Standardize, encoders
from modalmoe.model.fusion import Fusion, FusionOutput, fusions, masked_mean
from modalmoe.model.presets import get_preset
from modalmoe.moe.routers import routers
from modalmoe.moe.routers.base import Router, mask_logits, top_k_gating
from modalmoe.moe.types import Routing
from modalmoe.train import Trainer
from modalmoe.train.callbacks import Callback, callbacks

# --- the parts: what a user's new files would hold --------------------------------------


class CosineRouter(Router):
    """Top-k over cosine similarities to learned expert keys, with a temperature."""

    expert_params = {"keys": 0}
    accepts_mask = True

    def __init__(self, *, dim: int, num_experts: int, k: int = 2, temperature: float = 0.1) -> None:
        super().__init__(dim=dim, num_experts=num_experts, k=k)
        self.temperature = temperature
        self.keys = nn.Parameter(torch.randn(num_experts, dim))

    def forward(self, x: Tensor, modality: Tensor, sample: Tensor, allowed: Tensor | None = None) -> Routing:
        logits = nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(self.keys, dim=-1).t()
        logits = mask_logits(logits / self.temperature, allowed)
        index, weight, probs = top_k_gating(logits, self.k)
        return Routing(expert_index=index, weight=weight, probs=probs, logits=logits)


class TwoTokenVectorEncoder(Encoder):
    """[B, F] -> two tokens: the standardised features' two halves, each projected."""

    def __init__(self, *, spec, dim: int) -> None:
        super().__init__(spec=spec, dim=dim)
        self.half = spec.shape[0] // 2
        self.standardize = Standardize(spec.shape[0])
        self.proj = nn.Linear(self.half, dim)

    def fit(self, x: Tensor, present: Tensor, mask: Tensor | None = None) -> None:
        self.require_samples(present)
        self.standardize.fit(x[present])

    def embed(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        x = self.standardize(x)
        tokens = self.proj(torch.stack([x[:, : self.half], x[:, self.half : 2 * self.half]], 1))
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=x.device)


class MeanPoolFusion(Fusion):
    """No trunk at all: each modality's mean token, through one shared MLP."""

    def __init__(self, *, modalities, shape, width: int = 8, reduction=None) -> None:
        super().__init__(modalities=modalities, shape=shape, reduction=reduction)
        self.mlp = nn.Sequential(nn.Linear(self.dim, width), nn.GELU(), nn.Linear(width, self.dim))

    def forward(self, streams, task=None) -> FusionOutput:
        pooled = torch.stack([self.mlp(masked_mean(s.x, s.mask)) for s in streams], 1)
        present = torch.stack([s.mask.any(1) for s in streams], 1)
        return FusionOutput(pooled, present, {}, [], [s.x for s in streams])


class StepCounter(Callback):
    """Counts optimizer steps; its count is checkpointed and restored on resume."""

    name = "test_step_counter"
    instances: list[StepCounter] = []

    def __init__(self) -> None:
        self.steps = 0
        StepCounter.instances.append(self)

    def after_update(self, step, epoch, records, log) -> str:
        self.steps += 1
        return ""

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state) -> None:
        self.steps = state["steps"]


@pytest.fixture
def registered():
    """Register the four parts (a file's decorators), and take them out again afterwards."""
    added = [
        (routers, "test_cosine", CosineRouter),
        (encoders, "test_two_token", TwoTokenVectorEncoder),
        (fusions, "test_mean_pool", MeanPoolFusion),
        (callbacks, "test_step_counter", lambda config, console: StepCounter()),
    ]
    for registry, name, part in added:
        registry.register(name)(part)
    StepCounter.instances.clear()
    yield
    for registry, name, _ in added:
        registry._entries.pop(name)


def _config(**model):
    data = get_preset("tiny/token-choice").model_dump(mode="json")
    data["task_options"] = {"num_samples": 60, "dim": 8}
    data["train"].update(epochs=2, batch_size=16)
    for key, value in model.items():
        data["model"][key] = value if not isinstance(value, dict) else {**data["model"][key], **value}
    return validate(data)


def test_a_new_router_encoder_fusion_and_callback_train_through_the_unchanged_core(registered, tmp_path):
    config = _config(
        moe={"router": "test_cosine", "router_options": {"temperature": 0.2}, "reserved": {"modalities": {"m2": [3]}}},
        encoders={"m0": {"name": "test_two_token"}},
    )
    trainer = Trainer(config, tmp_path / "run", progress=False)
    result = trainer.fit()
    assert result.steps == 2 * math.ceil(len(trainer.task.train) / 16)
    counter = StepCounter.instances[-1]
    assert counter.steps == result.steps
    run = tmp_path / "run"
    model = Trainer(config, run, progress=False).run.load_model()
    layer = model.fusion.trunk.blocks[0].ffn
    assert type(layer.router) is CosineRouter and layer.router.temperature == 0.2
    assert type(model.encoders["m0"]) is TwoTokenVectorEncoder
    # The expert mask reached the new router: m2's reserved expert 3 is used by m2 only.
    batch = Trainer(config, run, progress=False).task.test.batch(torch.arange(8))
    for record in model(batch).records:
        chosen = record.expert_index[record.modality != 2]
        assert not bool((chosen == 3).any())
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["test"]) >= {"accuracy"}


def test_a_new_fusion_takes_its_options_from_the_config_and_typos_are_named(registered, tmp_path):
    config = _config(moe={"every": 0}, fusion={"name": "test_mean_pool", "options": {"width": 4}})
    result = Trainer(config, tmp_path / "run", progress=False).fit()
    model = Trainer(config, tmp_path / "run", progress=False).run.load_model()
    assert type(model.fusion) is MeanPoolFusion and model.fusion.mlp[0].out_features == 4
    assert result.steps > 0
    typo = _config(moe={"every": 0}, fusion={"name": "test_mean_pool", "options": {"widht": 4}})
    with pytest.raises(TypeError, match="fusion 'test_mean_pool' has no option 'widht'.*did you mean 'width'"):
        Trainer(typo, tmp_path / "typo", progress=False).fit()
    unknown = _config(moe={"every": 0}, fusion={"name": "test_mean_pol"})
    with pytest.raises(KeyError, match="unknown fusion 'test_mean_pol'.*Did you mean 'test_mean_pool'"):
        Trainer(unknown, tmp_path / "unknown", progress=False).fit()


def test_a_version_2_bottleneck_config_is_migrated_to_fusion_options():
    old = {"version": 2, "task": "tiny", "model": {"fusion": {"name": "bottleneck", "bottleneck_tokens": 6}}}
    assert validate(old).model.fusion.options == {"bottleneck_tokens": 6}
    early = {"version": 2, "task": "tiny", "model": {"fusion": {"name": "early", "bottleneck_tokens": 4}}}
    assert validate(early).model.fusion.options == {}
