"""Start an MoE model from a trained dense model: every MoE layer's experts are copies of the
dense block's FFN (``modalmoe.moe.upcycle``), everything else is taken as it is.

    transform = upcycle_transform(UpcycleConfig())
    init_from_run(moe_model, "runs/dense", transform=transform)   # what train.upcycle does

The MoE model must have the dense model's architecture apart from its FFNs (the same width,
depth, heads, encoders and heads): ``modalmoe train --upcycle-from RUN`` builds such a config
from the dense run's. At step 0 the upcycled model computes what the dense model computed
(its outputs and task loss, to float tolerance) when the routers allow it:

- routers that renormalise the chosen experts' weights to sum to 1 (``token_choice``,
  ``modality_experts``, ``per_modality``, ``hierarchical``, the default for all of them):
  exact with any router init (``router_init: tied``, a fresh router, its rows tied per copy of
  the FFN when experts are fine-grained) and with ``zero``;
- without renormalisation (``normalize: false``): exact with ``router_init: zero`` (uniform
  weights ``1/E``; the experts' outputs are scaled by ``E/k``), coarse experts only;
- ``expert_choice``: each expert picks its tokens, so a token may get any number of experts;
  exact only when every expert's capacity covers every token (``capacity_factor >= E/k``);
- ``soft`` mixes tokens into slots, so no copy of the FFN gives the FFN's output: refused.

``noise`` perturbs the copies (``1 + noise * N(0, 1)``, seeded by ``train.seed``) to break their
symmetry sooner; any noise > 0 gives up the step-0 equality.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from modalmoe.config import ExperimentConfig, UpcycleConfig, apply_overrides, load_config, validate
from modalmoe.moe.layer import MoELayer
from modalmoe.moe.upcycle import UpcycleError, check_granularity, expert_copies, shared_copy, tie_router

__all__ = ["UpcycleError", "UpcycleWarning", "upcycle_transform", "upcycled_experiment"]


class UpcycleWarning(UserWarning):
    """An upcycled model that does not start exactly at the dense model (expert choice)."""


def upcycled_experiment(run_dir: str | Path, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """The MoE experiment that upcycles the dense run ``run_dir``: the run's config with an MoE
    FFN in every block (``model.moe.every=1``, the run's ``model.moe`` settings: experts, k,
    router), ``train.init_from`` the run and ``train.upcycle`` set; then ``overrides``."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UpcycleError(f"{str(run_dir)!r} is not a run directory (no config.yaml); upcycle a `modalmoe train` run")
    dense = load_config(path)
    if dense.model.moe.every:
        raise UpcycleError(
            f"{str(run_dir)!r} is already an MoE run (model.moe.every={dense.model.moe.every}); upcycle a dense run"
        )
    data = dense.model_dump(mode="json")
    data["model"]["moe"]["every"] = 1
    data["train"]["init_from"] = str(Path(run_dir).resolve())
    data["train"]["upcycle"] = {}
    data["name"] = f"{dense.name or Path(run_dir).name}+upcycled"
    return validate(apply_overrides(data, overrides), source=f"upcycling {str(run_dir)!r}")


def upcycle_transform(config: UpcycleConfig, *, seed: int = 0):
    """A ``train.init.Transform``: a dense run's state -> the MoE model's (see the module docstring)."""

    def transform(model: nn.Module, saved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[int]]]:
        out = dict(saved)
        generator = torch.Generator().manual_seed(seed)
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
        if not layers:
            raise UpcycleError("the model has no MoE layer to upcycle into; use an MoE design (model.moe_every > 0)")
        for prefix, layer in layers:
            _upcycle_layer(prefix, layer, out, config, generator)
        return out, {}

    return transform


def _upcycle_layer(prefix: str, layer: MoELayer, state: dict[str, Any], config: UpcycleConfig, generator) -> None:
    keys = (f"{prefix}.w_in.weight", f"{prefix}.w_out.weight")
    if not all(isinstance(state.get(k), Tensor) for k in keys):
        raise UpcycleError(
            f"the dense run has no FFN at {prefix!r} ({keys[0]} is not in its checkpoint): upcycle a dense run "
            "whose blocks match this model's (same depth; MoE where the dense run has FFNs)"
        )
    w_in, w_out = (state.pop(k).float() for k in keys)
    router, bank = layer.router, layer.experts
    kind = type(router).__name__
    if kind == "SoftRouter":
        raise UpcycleError(
            "the soft router mixes tokens into slots, so no copy of the dense FFN computes the FFN's output; "
            "upcycle into a discrete router (token_choice, expert_choice, modality_experts, ...)"
        )
    if kind == "ExpertChoiceRouter" and router.experts_per_token < bank.num_experts:
        warnings.warn(
            f"{prefix}: expert choice lets each expert pick its tokens, so the upcycled model starts near, not at, "
            "the dense model (exact only with router_options.experts_per_token equal to the number of experts)",
            UpcycleWarning,
            stacklevel=4,
        )
    if w_in.shape[1] != bank.dim:
        raise UpcycleError(f"{prefix}: the dense FFN is {w_in.shape[1]} wide, the MoE layer {bank.dim}; same model.dim")
    experts, k = bank.num_experts, getattr(router, "k", None)
    shared_width = 0 if layer.shared is None else layer.shared.w_out.weight.shape[1]
    hidden = w_out.shape[1]
    routed_in, routed_out, shared_fraction = w_in, w_out, 0.0
    if 0 < shared_width < hidden:
        # Fine-grained with shared experts (DeepSeek-MoE's layout, the presets' default): the shared
        # experts hold the FFN's first units as they are, the routed experts copies of the rest.
        lead = slice(0, shared_width)
        rest = slice(shared_width, hidden)
        s_in = _units(w_in, lead, hidden, bank.activation)
        state[f"{prefix}.shared.w_in.weight"], state[f"{prefix}.shared.w_out.weight"] = s_in, w_out[:, lead].clone()
        routed_in, routed_out = _units(w_in, rest, hidden, bank.activation), w_out[:, rest]
    elif shared_width:
        active = (k or experts) * bank.hidden
        shared_fraction = (
            shared_width / (shared_width + active) if config.shared_fraction is None else config.shared_fraction
        )
        s_in, s_out = shared_copy(w_in, w_out, width=shared_width, activation=bank.activation, scale=shared_fraction)
        state[f"{prefix}.shared.w_in.weight"], state[f"{prefix}.shared.w_out.weight"] = s_in, s_out
    granularity = check_granularity(routed_out.shape[1], bank.hidden, experts, k)
    normalize = getattr(router, "normalize", True)
    zero = config.router_init == "zero"
    scale = 1.0
    if not normalize:
        if granularity > 1 or not zero:
            raise UpcycleError(
                f"{prefix}: a router that keeps raw weights (normalize: false) computes the dense FFN at step 0 only "
                f"with coarse experts (model.moe.expert_hidden={routed_out.shape[1]}) and train.upcycle.router_init: "
                "zero"
            )
        scale = experts / max(1, k or experts)
    bank_in, bank_out = expert_copies(
        routed_in,
        routed_out,
        experts=experts,
        granularity=granularity,
        activation=bank.activation,
        scale=scale * (1.0 - shared_fraction),
        noise=config.noise,
        generator=generator,
    )
    state[f"{prefix}.experts.w_in"], state[f"{prefix}.experts.w_out"] = bank_in, bank_out
    for name, param in router.named_parameters():
        value = torch.zeros_like(param) if zero else param.detach()
        state[f"{prefix}.router.{name}"] = tie_router(value, num_experts=experts, granularity=granularity)


def _units(w_in: Tensor, units: slice, hidden: int, activation: str) -> Tensor:
    """The rows of ``nn.Linear`` weight ``w_in`` of these hidden units (gate and up rows for SwiGLU)."""
    if activation == "swiglu":
        return torch.cat([w_in[:hidden][units], w_in[hidden:][units]]).clone()
    return w_in[units].clone()
