"""The data-free route: reference activations -> generated adapters -> guarded change.

``plan_mitigation`` runs K steps; each recomputes the activations of the model as changed so
far, generates one adapter per layer and composes ``W <- W (I + alpha V^T U)``; the drift
guard (``telelora.guard``) bounds the result. The weights of the model it reads are never
changed; ``telelora.mitigate`` writes the change into a copy of the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from tqdm import tqdm

from telelora import activations, guard
from telelora.adapters import Adapter, LowRankDelta
from telelora.architectures import AdaptedLayer, find_adapted_layers
from telelora.generator import GeneratorBank
from telelora.metaparameters import Metaparameters
from telelora.texts import Texts

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_adapters(
    bank: GeneratorBank,
    model,
    tokenizer,
    layers: list[AdaptedLayer],
    texts: list[str],
    meta: Metaparameters,
    seed: int,
) -> dict[str, Adapter]:
    """One adapter per layer from the model's current activations; non-finite ones are dropped."""
    acts = activations.collect(
        model, tokenizer, layers, texts, meta.activation_tokens, meta.activation_batch_size, meta.max_tokens, seed
    )
    bank_device = next(bank.parameters()).device
    adapters = {}
    for layer in layers:
        u, v = bank(layer.projection_type, acts.pop(layer.name).to(bank_device), layer.depth, meta.rank)
        adapter = Adapter(u, v)
        if adapter.is_finite():
            adapters[layer.name] = adapter
        else:
            log.warning("non-finite adapter for %s; this layer is left unchanged", layer.name)
    return adapters


@dataclasses.dataclass
class Mitigation:
    """The change ``mitigate`` computed for one model, not yet written anywhere."""

    layers: list[AdaptedLayer]
    delta: LowRankDelta
    layer_bound: guard.LayerBound
    drift_guard: guard.DriftGuard


def generated_delta(
    model,
    tokenizer,
    bank: GeneratorBank,
    layers: list[AdaptedLayer],
    reference: list[str],
    meta: Metaparameters,
    layer_ranges: dict[str, float] | None = None,
    bound: guard.LayerBound | None = None,
) -> LowRankDelta:
    """K generated adapter steps, before the drift guard; the model's weights are not touched.

    Steps after the first read the activations of the model as changed so far (applied by
    hooks, in float32). Each step's adapters are bounded per layer by the ranges seen in
    meta-training (when given; ``bound`` records what that did)."""
    delta, bound = LowRankDelta(), bound or guard.LayerBound()
    for step in tqdm(range(meta.mitigation_steps), desc="mitigation steps", disable=meta.mitigation_steps == 1):
        with delta.applied(layers):
            adapters = generate_adapters(bank, model, tokenizer, layers, reference, meta, seed=meta.seed + step)
        adapters = guard.bound_layers(adapters, layers, layer_ranges, meta.guard_layer_factor, bound)
        delta.add_step(layers, adapters, meta.step_size)
    return delta


def plan_mitigation(
    model, tokenizer, bank, texts: Texts, meta: Metaparameters, layer_ranges: dict[str, float] | None
) -> Mitigation:
    """:func:`generated_delta`, then scaled down as a whole if the model, run with it, drifts
    too far from its own answers on shipped prompts (``telelora.guard``); the model's weights
    are not touched."""
    layers = find_adapted_layers(model, meta.target_projections)
    reference = texts.reference[: meta.num_reference_texts]
    if len(reference) < meta.rank:
        raise ValueError(f"rank {meta.rank} needs at least as many reference texts, but only {len(reference)} ship")
    if len(reference) < meta.num_reference_texts:
        log.warning("only %d reference texts ship; using all of them", len(reference))
    bound = guard.LayerBound()
    delta = generated_delta(model, tokenizer, bank, layers, reference, meta, layer_ranges, bound)
    drift = guard.DriftGuard(min_agreement=meta.guard_min_agreement)  # nothing to guard without a change
    if len(delta):
        drift = guard.fit_scale(
            model,
            tokenizer,
            lambda scale: delta.applied(layers, factor=scale),
            texts.alignment[: meta.guard_prompts],
            meta.guard_min_agreement,
            meta.guard_answer_tokens,
            meta.activation_batch_size,
        )
        if drift.scale < 1:
            delta.scale(drift.scale)
    log.info(
        "adapted %d layers over %d step(s); %d shrunk by the layer bound; drift guard scale %.3f",
        len(delta),
        meta.mitigation_steps,
        bound.layers_shrunk,
        drift.scale,
    )
    return Mitigation(layers, delta, bound, drift)


def mitigate_model(
    model, tokenizer, bank, texts: Texts, meta: Metaparameters, layer_ranges: dict[str, float] | None = None
) -> Mitigation:
    """:func:`plan_mitigation`, merged into ``model``'s weights in place (for benches and
    experiments; the ``mitigate`` job writes the change into a copy of the checkpoint)."""
    mitigation = plan_mitigation(model, tokenizer, bank, texts, meta, layer_ranges)
    mitigation.delta.merge(mitigation.layers)
    for layer in mitigation.layers:
        if not torch.isfinite(layer.module.weight).all():
            raise FloatingPointError(f"merged weight of {layer.name} is not finite")
    return mitigation
