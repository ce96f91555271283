"""The merge route: weights merged toward references, checked before anything is written.

``W <- (1 - sum_i w_i) W + sum_i w_i W_i`` with per-reference weights ``w_i``, at first
``reference_weight / n`` each (the mean of ``n`` references), for every weight or, with
``merge_from_depth`` > 0, for the transformer blocks from that relative depth on
(``telelora.reference.merged_tensors``). Two checks run on the input
model with the merge applied in memory, and lower the weights before the merge is written:

* **trigger check**, for each poisoned reference (its triggers declared by the round): its
  declared response must set off on at most ``trigger_check_max_asr`` of
  ``trigger_check_prompts`` shipped prompts carrying its trigger. While it fires more, that
  reference's weight is halved, and after ``TRIGGER_CHECK_TRIES`` tries dropped. A reference
  whose own Trojan survives the merge would plant it in the output.
* **drift guard**: the merged model must rank first at least ``merge_min_agreement`` of the
  input's own greedy answer tokens on ``guard_prompts`` shipped prompts, else every weight is
  scaled down (``telelora.guard.fit_scale``), as the generators' change is.

Then, with ``repair_prompts`` > 0, the **repair** (``telelora.repair``): the input's own answers
to shipped prompts are distilled back into the merged model through a LoRA per projection, and
the written weights are the merge plus that change. It is gated: only a merge whose guard
reading (agreement with the input on the guard prompts) is at most ``repair_max_agreement`` is
repaired. A merge that kept nearly all of the input's answers is a small change (a LoRA
fine-tune's merge), and a low-rank repair of it can re-grow a low-rank Trojan; a merge that cost
many answers (a full fine-tune's) is where the repair gains.

The tries and the write share one read of each reference (``telelora.reference.merge_trial``).
Without a poisoned reference and with the guard and the repair off, no model is built: the merge
is written tensor by tensor from disk. Every weight dropped: the caller runs the generators.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from telelora import guard, modelio, reference, repair
from telelora.adapters import LowRankDelta
from telelora.alignment import Trigger, place_trigger
from telelora.architectures import find_adapted_layers
from telelora.chat import hit_rate
from telelora.metaparameters import Metaparameters
from telelora.reference import Reference
from telelora.texts import Texts

log = logging.getLogger(__name__)
TRIGGER_CHECK_TRIES = 3  # a firing reference is tried at w, w/2, w/4, then dropped


@dataclasses.dataclass
class TriggerCheck:
    """What the trigger check saw of one poisoned reference: its declared ASR on the merged
    model at each weight tried, and the weight it kept (0: dropped)."""

    reference: str
    triggers: list[str]
    tried: list[dict] = dataclasses.field(default_factory=list)  # {"weight": w, "asr": a}
    weight: float = 0.0


@dataclasses.dataclass
class Repair:
    """What the repair did: its examples, its steps' first and last loss, and the change it
    adds to the merge (not reported)."""

    merge_agreement: float | None = None  # the gate's reading (None: not measured, the gate is 1)
    prompts: int = 0
    examples: int = 0
    steps: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    skipped: str = ""  # why no repair was added, where none was
    seconds: float = 0.0  # the teacher's answers and the training steps
    delta: LowRankDelta | None = dataclasses.field(default=None, repr=False)

    def report(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "delta"}


@dataclasses.dataclass
class MergePlan:
    """The merge as the checks left it, not yet written."""

    references: list[Reference]
    weights: list[float]
    trigger_checks: list[TriggerCheck]
    drift_guard: guard.DriftGuard
    trial: reference.MergeTrial = dataclasses.field(default_factory=reference.MergeTrial)
    from_depth: float = 0.0  # merge_from_depth: which blocks are merged
    repair: Repair | None = None  # None: repair_prompts is 0
    # the references as the checks read them, for the write to reuse (empty: read from disk)
    held: reference.HeldReferences = dataclasses.field(default_factory=dict, repr=False)

    @property
    def merges(self) -> bool:
        return sum(self.weights) > 0

    def kept(self) -> tuple[list[Path], list[float]]:
        """The references with a weight, and their weights."""
        pairs = [(r.path, w) for r, w in zip(self.references, self.weights, strict=True) if w > 0]
        return [p for p, _ in pairs], [w for _, w in pairs]


def declared_asr(model, tokenizer, triggers: tuple[Trigger, ...], prompts: list[str], meta: Metaparameters) -> float:
    """The largest share, over a reference's declared triggers, of ``prompts`` carrying the
    trigger whose greedy answer holds its declared response (within
    ``trigger_check_answer_tokens`` + the response: NIST's Trojans append it after the answer)."""
    rates = []
    for trigger in triggers:
        rng = random.Random(meta.seed)
        placed = [place_trigger(p, trigger.text, trigger.placement, rng) for p in prompts]
        budget = meta.trigger_check_answer_tokens
        rates.append(hit_rate(model, tokenizer, placed, [trigger.target], meta.activation_batch_size, None, budget))
    return max(rates)


def needs_model(references: list[Reference], meta: Metaparameters) -> bool:
    """Whether the checks need the model built (else the merge is written from disk alone)."""
    return meta.merge_min_agreement > 0 or meta.repair_prompts > 0 or any(r.kind == "poisoned" for r in references)


def plan_merge(
    model_dir: Path,
    references: list[Reference],
    meta: Metaparameters,
    texts: Texts | None,
    load: Callable[[], tuple[object, object]],
) -> MergePlan:
    """The checked merge of ``model_dir`` toward ``references``; ``load()`` gives the input's
    (model, tokenizer), called only when a check needs them (``texts`` may be None when none
    does: :func:`needs_model`). The model's weights are the input's again on return."""
    weights = [meta.reference_weight / len(references)] * len(references)
    plan = MergePlan(
        list(references),
        weights,
        [],
        guard.DriftGuard(min_agreement=meta.merge_min_agreement),
        from_depth=meta.merge_from_depth,
    )
    if not needs_model(references, meta):
        return plan
    model, tokenizer = load()
    dirs = [r.path for r in references]
    with reference.merge_trial(model, model_dir, dirs, plan.trial, plan.from_depth, keep=plan.held) as merged:
        _check_triggers(model, tokenizer, references, weights, merged, texts, meta, plan)
        if sum(weights) > 0 and meta.merge_min_agreement > 0:
            plan.drift_guard = guard.fit_scale(
                model,
                tokenizer,
                lambda scale: merged([w * scale for w in weights]),
                texts.alignment[: meta.guard_prompts],
                meta.merge_min_agreement,
                meta.guard_answer_tokens,
                meta.activation_batch_size,
            )
            weights = [w * plan.drift_guard.scale for w in weights]
        if sum(weights) > 0 and meta.repair_prompts > 0:
            reading = None  # an open gate without the guard's figure measures nothing
            if meta.repair_max_agreement < 1 or plan.drift_guard.applied:
                reading = gate_reading(model, tokenizer, lambda: merged(weights), texts, meta, plan.drift_guard)
            if not repairs(reading, meta):
                gate = meta.repair_max_agreement
                why = f"the merge keeps {reading:.3f} of the input's answers > repair_max_agreement {gate}"
                log.info("no repair: %s", why)
                plan.repair = Repair(merge_agreement=reading, skipped=why)
            else:
                plan.repair = _repair(model, tokenizer, lambda: merged(weights), texts, meta)
                plan.repair.merge_agreement = reading
    plan.weights = weights
    return plan


def gate_reading(model, tokenizer, merged, texts: Texts, meta: Metaparameters, drift: guard.DriftGuard) -> float:
    """The repair gate's reading of the merge at its kept weights (``merged()``: the context
    where the model computes as it): the drift guard's where it ran, else measured alike."""
    if drift.applied:
        return drift.agreement
    prompts = texts.alignment[: meta.guard_prompts]
    return guard.agreement_with_input(
        model, tokenizer, merged(), prompts, meta.guard_answer_tokens, meta.activation_batch_size
    )


def repairs(reading: float | None, meta: Metaparameters) -> bool:
    """Whether the gate lets the repair run on a merge read at ``reading`` (None: not read, open)."""
    return reading is None or reading <= meta.repair_max_agreement


def _repair(model, tokenizer, merged, texts: Texts, meta: Metaparameters) -> Repair:
    """The repair's change of the merge (``merged()``: the context where the model computes as
    it). Out of accelerator memory, one loud line and no repair: the plain merge is written."""
    prompts = texts.alignment[: meta.repair_prompts]
    if len(prompts) < meta.repair_prompts:
        log.warning("only %d alignment prompts ship; the repair uses all of them", len(prompts))
    record, start = Repair(prompts=len(prompts)), time.perf_counter()
    try:
        examples = repair.teacher_examples(model, tokenizer, prompts, meta)  # the input, before the merge
        record.examples = len(examples)
        with merged():
            layers = find_adapted_layers(model, meta.target_projections)
            record.delta, losses = repair.distil(model, tokenizer, layers, examples, meta)
    except (torch.OutOfMemoryError, ValueError) as err:
        log.error("MERGE NOT REPAIRED (%s: %s); the plain merge is written", type(err).__name__, err)
        record.skipped, record.delta = f"{type(err).__name__}: {err}", None
        return record
    finally:
        record.seconds = round(time.perf_counter() - start, 3)
    record.steps = len(losses)
    if losses:
        record.first_loss, record.last_loss = round(losses[0], 6), round(losses[-1], 6)
    else:
        record.skipped, record.delta = "no repair step had a finite loss", None
    return record


def _check_triggers(model, tokenizer, references, weights, merged, texts, meta, plan: MergePlan) -> None:
    """The trigger check: halve, then drop (``weights`` in place), each poisoned reference
    whose declared Trojan still fires on the model merged by ``merged(weights)``."""
    poisoned = [i for i, r in enumerate(references) if r.kind == "poisoned"]
    prompts = texts.alignment[: meta.trigger_check_prompts]
    checks = {i: TriggerCheck(str(references[i].path), [t.text for t in references[i].triggers]) for i in poisoned}
    for attempt in range(TRIGGER_CHECK_TRIES if poisoned else 0):
        live = [i for i in poisoned if weights[i] > 0]
        if not live:
            break
        with merged(weights):
            rates = {i: declared_asr(model, tokenizer, references[i].triggers, prompts, meta) for i in live}
        firing = []
        for i, rate in rates.items():
            checks[i].tried.append({"weight": weights[i], "asr": rate})
            if rate > meta.trigger_check_max_asr:
                firing.append(i)
        if not firing:
            break
        for i in firing:
            weights[i] = weights[i] / 2 if attempt < TRIGGER_CHECK_TRIES - 1 else 0.0
            log.warning("TRIGGER CHECK: the Trojan of reference %s still fires on the merge (ASR %.2f > %.2f); "
                        "its weight is now %.3f", references[i].path, rates[i], meta.trigger_check_max_asr,
                        weights[i])  # fmt: skip
    for i, check in checks.items():
        check.weight = weights[i]
    plan.trigger_checks = list(checks.values())


def save_merge(
    model_dir: Path, output_dir: Path, plan: MergePlan, extra_files: dict[str, str], exclude: list[Path]
) -> None:
    """Write the input with its weights merged as ``plan`` says, tensor by tensor (no model is
    built): one read of the input, one write, and the references' tensors as the checks held
    them (``plan.held``), else one read of each."""
    dirs, weights = plan.kept()
    with reference.open_references(dirs, weights, plan.held) as tensor:
        changes = reference.merge_changes(model_dir, tensor, sum(weights), plan.from_depth)
        if plan.repair is not None and plan.repair.delta is not None:
            changes = repaired_changes(model_dir, changes, plan.repair.delta)
        modelio.save_mitigated(model_dir, output_dir, changes, extra_files, exclude)


def repaired_changes(model_dir: Path, changes: dict, delta: LowRankDelta) -> dict:
    """``changes`` with the repair's ``W + B A`` added after the merge of each adapted weight
    (or alone, for a weight the merge leaves as it is)."""
    factors = delta.stacked()
    shapes = {f"{name}.weight": (b.shape[0], a.shape[1]) for name, (a, b) in factors.items()}
    names = modelio.checkpoint_names(model_dir, shapes)
    out = dict(changes)
    for name, (a, b) in factors.items():
        key = names[f"{name}.weight"]
        out[key] = _then(changes.get(key), modelio.add_low_rank(a, b))
    return out


def _then(first, second):
    return second if first is None else (lambda stored: second(first(stored)))
