"""Compute matching: resize one width of a design so that it costs a given budget.

Designs are compared at equal compute (FLOP-matched baselines, as in Switch Transformer,
Fedus et al. 2021, and Expert Choice, Zhou et al. 2022): each design's width is solved so that
its forward FLOPs per sample (``mode="flops"``, ``efficiency.measure_cost``) or its total
parameters (``mode="params"``) equal a budget, usually a reference design's cost:

    kw = dict(task_type="classification", outputs=10)
    budget = reference_budget(get_preset("av-digits/dense-early"), specs, batch, **kw)
    matched = match_compute(get_preset("av-digits/soft"), specs, batch, budget=1.3 * budget, **kw)

The width is ``model.hidden`` for a dense design, ``model.moe.expert_hidden`` for an MoE design
(the dense blocks of an every-other MoE model keep ``hidden``). Both costs are affine in it
(each FFN or expert matmul is linear in it) up to rounding and, with capacity limits, routing
that depends on the initial weights: two measurements give the line, and the rounded solution
is measured to verify it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from modalmoe.config import ExperimentConfig, apply_overrides, validate
from modalmoe.efficiency.flops import Cost, measure_cost
from modalmoe.model.multimodal import build_model

MODES = ("flops", "params")


class BudgetError(ValueError):
    """No width of the design reaches the budget; the message names the design and its range.

    ``too_expensive``: even the smallest width costs more than the budget.
    """

    too_expensive: bool = False


@dataclass
class Matched:
    """A design resized to a budget.

    Attributes:
        config: the design with its width set.
        cost: its measured cost.
        width_field: the config key that was solved (``model.hidden`` or ``model.moe.expert_hidden``).
        width: the solved width.
        target: the budget.
        achieved: the measured FLOPs per sample or parameters.
        relative_error: ``(achieved - target) / target``.
    """

    config: ExperimentConfig
    cost: Cost
    width_field: str
    width: int
    target: float
    achieved: float
    relative_error: float


def width_field(config: ExperimentConfig) -> str:
    """The width compute matching solves for: the dense FFN's or the experts'."""
    return "model.hidden" if config.model.moe.every == 0 else "model.moe.expert_hidden"


def with_width(config: ExperimentConfig, field: str, width: int) -> ExperimentConfig:
    """A validated copy of ``config`` with ``field`` (a dotted key) set to ``width``."""
    data = apply_overrides(config.model_dump(), [f"{field}={int(width)}"])
    return validate(data, ExperimentConfig, source=f"for {config.name or 'the design'} with {field}={width}")


def measure(config: ExperimentConfig, specs: Mapping, batch, *, task_type: str, outputs, fit_data=None) -> Cost:
    """Build the design (seed 0, the caller's RNG state untouched) and measure it on ``batch``.

    Args:
        fit_data: a training split for the data-dependent encoder state (the learned text
            tokenizer needs it; input standardisation does not change FLOPs).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(config.model, specs, task_type=task_type, outputs=outputs)
        if fit_data is not None:
            model.fit(fit_data)
        return measure_cost(model, batch)


def _value(cost: Cost, mode: str) -> float:
    if mode not in MODES:
        raise ValueError(f"unknown compute-matching mode {mode!r}; choose one of {MODES}")
    return float(cost.flops if mode == "flops" else cost.params)


def _current(config: ExperimentConfig) -> int:
    """The design's width as built (an unset expert width is ``hidden // (k + shared)``)."""
    model, moe = config.model, config.model.moe
    return model.hidden if not moe.every else moe.expert_hidden or max(1, model.hidden // (moe.k + moe.shared_experts))


def reference_budget(
    config: ExperimentConfig, specs: Mapping, batch, *, task_type: str, outputs, mode: str = "flops", fit_data=None
) -> float:
    """The FLOPs per sample or parameters of a reference design (e.g. ``<task>/dense-early``), as built."""
    cost = measure(config, specs, batch, task_type=task_type, outputs=outputs, fit_data=fit_data)
    return _value(cost, mode)


def match_compute(config: ExperimentConfig, specs: Mapping, batch, **kw) -> Matched:
    """Solve the design's width so that its cost equals ``budget`` within ``tolerance``; when
    even width 1 is too expensive (designs whose attention or fusion tokens alone exceed the
    budget: bottleneck and cross fusion), shrink ``model.dim`` in steps of ``heads`` and solve
    the width again at the largest model width that can meet the budget.

    Args and raises: see ``match_width`` (the keyword arguments are passed on to it).
    """
    try:
        return match_width(config, specs, batch, **kw)
    except BudgetError as err:
        if not err.too_expensive:
            raise
        first = err
    heads, dim = config.model.heads, config.model.dim
    for smaller in range(dim - heads, 0, -heads):
        cfg = with_width(config, "model.dim", smaller)
        try:
            matched = match_width(cfg, specs, batch, **kw)
        except BudgetError as err:
            if err.too_expensive:
                continue
            raise
        matched.width_field = f"model.dim={smaller}, {matched.width_field}"
        return matched
    raise first


def match_width(
    config: ExperimentConfig,
    specs: Mapping,
    batch,
    *,
    task_type: str,
    outputs,
    budget: float,
    mode: str = "flops",
    tolerance: float = 0.05,
    fit_data=None,
    max_width: int = 4096,
) -> Matched:
    """Solve the design's width so that its cost equals ``budget`` within ``tolerance``.

    Args:
        config: the design; its width field is replaced.
        specs: modality name -> ``ModalitySpec``.
        batch: the batch FLOPs per sample are measured on (fix it across designs: absent
            modalities contribute no tokens, so the cost depends on the batch).
        task_type, outputs: as for ``build_model``.
        budget: target FLOPs per sample (``mode="flops"``) or parameters (``"params"``).
        tolerance: accepted ``|achieved - budget| / budget``.
        fit_data: see ``measure``.
        max_width: the largest width tried.

    Raises:
        BudgetError: no width in ``[1, max_width]`` lands within tolerance.
    """
    if mode not in MODES or budget <= 0 or max_width < 2:
        raise ValueError(f"need a mode in {MODES}, budget > 0, max_width >= 2; got {mode!r}, {budget}, {max_width}")
    field = width_field(config)
    costs: dict[int, Cost] = {}

    def value(width: int) -> float:
        if width not in costs:
            cfg = with_width(config, field, width)
            costs[width] = measure(cfg, specs, batch, task_type=task_type, outputs=outputs, fit_data=fit_data)
        return _value(costs[width], mode)

    def error(width: int) -> float:
        return abs(value(width) - budget) / budget

    # Two points give the line; a secant step through the two latest points follows it where
    # capacity limits or rounding bend it; outside tolerance, the next width towards the budget is tried.
    low, high = 1, max(2, min(max_width, _current(config)))
    for _ in range(4):
        slope = (value(high) - value(low)) / (high - low)
        guess = min(max_width, max(1, round(low + (budget - value(low)) / slope))) if slope > 0 else low
        if guess in costs or error(guess) <= tolerance:
            break
        low, high = sorted((high, guess))
    best = min(costs, key=error)
    step = best + (1 if value(best) < budget else -1)
    if error(best) > tolerance and 1 <= step <= max_width:
        error(step)
        best = min(costs, key=error)
    if error(best) > tolerance:
        if best == 1 and value(1) > budget:
            why = f"even {field}=1 costs {value(1):.4g}, the smallest it can cost"
        elif best == max_width and value(best) < budget:
            why = f"even {field}={best} costs {value(best):.4g}, the largest it can cost (see max_width)"
        else:
            why = f"no integer {field} is within {tolerance:.0%} (closest: {value(best):.4g} at {best})"
        name = config.name or f"a design of task {config.task!r}"
        error_ = BudgetError(f"{name} cannot meet the {mode} budget {budget:.4g}: {why}")
        error_.too_expensive = best == 1 and value(1) > budget
        raise error_
    achieved = value(best)
    return Matched(
        config=with_width(config, field, best),
        cost=costs[best],
        width_field=field,
        width=best,
        target=budget,
        achieved=achieved,
        relative_error=(achieved - budget) / budget,
    )
