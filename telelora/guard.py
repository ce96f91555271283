"""The drift guard: bounds on how far ``mitigate`` may move a model it has never seen.

The generators were meta-trained on a handful of LLMs; on a wider or otherwise unfamiliar
model they can write adapters far larger than any they produced in training, and a step
large enough to wreck the model scores zero on the leaderboard. Two data-free bounds:

* **per layer**: each step's ``V^T U`` may have a spectral norm (the largest factor by which
  it stretches any input) of at most ``guard_layer_factor`` times the largest the
  generators gave that projection type on their training models, recorded with the learned
  parameters (:func:`layer_ranges`);
* **whole model**: the mitigated model, run with the change hooked in, must still rank first
  at least ``guard_min_agreement`` of the unmitigated model's own greedy answer tokens on
  shipped prompts; otherwise the whole change is scaled down (bisection) until it does.

Neither knows anything of a Trojan: they keep a change that stays close to the model and
shrink one that does not. What they did goes into ``telelora_report.json``.

Learned parameters from before ``configure`` recorded the ranges get them from
``python -m telelora.calibrate``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable

import torch

from telelora.adapters import Adapter
from telelora.architectures import AdaptedLayer
from telelora.chat import agreement, greedy_answers

log = logging.getLogger(__name__)
SEARCH_STEPS = 6  # bisection steps on the scale: the kept scale is within 1/64 of the largest allowed


def spectral_norm(adapter: Adapter) -> float:
    """``||V^T U||_2`` through the r x r core: ``V^T = Q_v R_v``, ``U^T = Q_u R_u`` give
    ``V^T U = Q_v (R_v R_u^T) Q_u^T``, whose norm is that of ``R_v R_u^T``."""
    r_v = torch.linalg.qr(adapter.v.double().T, mode="r").R
    r_u = torch.linalg.qr(adapter.u.double().T, mode="r").R
    return float(torch.linalg.matrix_norm(r_v @ r_u.T, ord=2))


def layer_ranges(norms: list[tuple[str, float]]) -> dict[str, float]:
    """The largest ``||V^T U||_2`` per projection type over ``(type, norm)`` pairs."""
    ranges: dict[str, float] = {}
    for projection_type, norm in norms:
        ranges[projection_type] = max(ranges.get(projection_type, 0.0), norm)
    return {k: math.ceil(v * 1e6) / 1e6 for k, v in sorted(ranges.items())}  # rounded up: the largest stays inside


@dataclasses.dataclass
class LayerBound:
    """What the per-layer bound did in one mitigation (all steps)."""

    applied: bool = False
    reason: str = ""
    layers_checked: int = 0
    layers_shrunk: int = 0
    largest_ratio: float = 0.0  # largest ||V^T U||_2 / bound seen before shrinking


def bound_layers(
    adapters: dict[str, Adapter],
    layers: list[AdaptedLayer],
    ranges: dict[str, float] | None,
    factor: float,
    record: LayerBound,
) -> dict[str, Adapter]:
    """Shrink each adapter whose ``||V^T U||_2`` exceeds ``factor`` times its type's range."""
    if factor <= 0:
        record.reason = "off (guard_layer_factor 0)"
        return adapters
    if not ranges:
        record.reason = "off: the learned parameters record no layer ranges (run python -m telelora.calibrate)"
        return adapters
    record.applied, record.reason = True, f"{factor} x the meta-training range"
    bounded = {}
    for layer in layers:
        adapter = adapters.get(layer.name)
        if adapter is None:
            continue
        bound = factor * ranges.get(layer.projection_type, 0.0)
        norm = spectral_norm(adapter)
        record.layers_checked += 1
        if bound <= 0:
            bounded[layer.name] = Adapter(adapter.u, torch.zeros_like(adapter.v))  # a type training never moved
            record.layers_shrunk += norm > 0
            continue
        record.largest_ratio = max(record.largest_ratio, norm / bound)
        if norm > bound:
            adapter = Adapter(adapter.u, adapter.v * (bound / norm))
            record.layers_shrunk += 1
        bounded[layer.name] = adapter
    return bounded


@dataclasses.dataclass
class DriftGuard:
    """What the whole-model guard measured and chose."""

    applied: bool = False
    min_agreement: float = 0.0
    prompts: int = 0
    agreement_unscaled: float | None = None
    scale: float = 1.0
    agreement: float | None = None
    evaluations: int = 0
    seconds: float = 0.0


@torch.no_grad()
def agreement_with_input(
    model,
    tokenizer,
    applied: contextlib.AbstractContextManager,
    prompts: list[str],
    answer_tokens: int,
    batch_size: int,
) -> float:
    """The share of the unchanged model's own greedy answer tokens on ``prompts`` that it still
    ranks first inside ``applied`` (the guard's reading, without a bound)."""
    answers = greedy_answers(model, tokenizer, prompts, answer_tokens, batch_size)
    with applied:
        return agreement(model, tokenizer, prompts, answers, batch_size)


@torch.no_grad()
def fit_scale(
    model,
    tokenizer,
    applied: Callable[[float], contextlib.AbstractContextManager],
    prompts: list[str],
    min_agreement: float,
    answer_tokens: int,
    batch_size: int,
) -> DriftGuard:
    """The largest scale of a change (found by bisection) at which the model keeps
    ``min_agreement`` of its own answers; the caller scales the change by ``record.scale``.

    ``model`` is the unmitigated model; ``applied(scale)`` is a context in which it computes
    with the change at that scale (hooks for the generators' adapters, merged weights for a
    merge), so its own weights are never changed for good. Agreement falls as the scale grows
    (not strictly, so bisection finds a scale that passes, not always the largest). A scale of
    0 always passes."""
    record = DriftGuard(applied=min_agreement > 0, min_agreement=min_agreement)
    if not record.applied:
        return record
    start = time.time()
    answers = greedy_answers(model, tokenizer, prompts, answer_tokens, batch_size)
    record.prompts = len(prompts)

    def agreement_at(scale: float) -> float:
        record.evaluations += 1
        with applied(scale):
            return agreement(model, tokenizer, prompts, answers, batch_size)

    record.agreement_unscaled = record.agreement = agreement_at(1.0)
    if record.agreement_unscaled < min_agreement:
        low, high, kept = 0.0, 1.0, 1.0  # scale 0 is the unchanged model: it agrees with itself
        for _ in range(SEARCH_STEPS):
            middle = (low + high) / 2
            value = agreement_at(middle)
            if value >= min_agreement:
                low, kept = middle, value
            else:
                high = middle
        record.scale, record.agreement = low, kept
        log.warning(
            "drift guard: agreement %.3f < %.3f at full strength; the change is scaled to %.3f (agreement %.3f)",
            record.agreement_unscaled,
            min_agreement,
            record.scale,
            record.agreement,
        )
    record.seconds = round(time.time() - start, 3)
    return record
