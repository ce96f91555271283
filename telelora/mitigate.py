"""Mitigation: a merge toward clean reference models when the round gives them, else zero-shot
generation: reference activations -> generated adapters -> guarded change -> weights.

``telelora.reference`` finds the clean models and merges (the first choice when NIST passes
``--round_training_dataset_dirpath``; ``reference_weight`` 0 turns it off). Otherwise
``plan_mitigation`` runs K steps; each recomputes the activations of the model as changed
so far, generates one adapter per layer and composes ``W <- W (I + alpha V^T U)``; the drift
guard (``telelora.guard``) bounds the result. ``run`` is the NIST job around it: it checks
its inputs before loading anything, and once they pass it *always* leaves a loadable model
+ tokenizer behind, the unchanged one (with a loud log line) if anything fails.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from telelora import activations, guard, modelio, reference
from telelora.adapters import Adapter, LowRankDelta, export_peft
from telelora.architectures import AdaptedLayer, find_adapted_layers
from telelora.errors import TeleLoRAError
from telelora.generator import GeneratorBank
from telelora.io_utils import atomic_write_text
from telelora.learned import load_bank
from telelora.metaparameters import Metaparameters
from telelora.texts import Texts
from telelora.texts import load as load_texts

log = logging.getLogger(__name__)
REPORT_FILE = "telelora_report.json"


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
    drift = guard.fit_scale(
        model,
        tokenizer,
        layers,
        delta,
        texts.alignment[: meta.guard_prompts],
        meta.guard_min_agreement,
        meta.guard_answer_tokens,
        meta.activation_batch_size,
    )
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


@dataclasses.dataclass
class MitigationReport:
    """``telelora_report.json``: what happened, so a reader of the output folder knows."""

    mitigated: bool
    reason: str
    model_architecture: str | None
    method: str = "generators"  # or "reference_merge"
    reference_models: list[str] = dataclasses.field(default_factory=list)
    reference_weight: float | None = None
    num_layers_adapted: int = 0
    device: str | None = None
    compute_dtype: str | None = None
    layer_bound: dict | None = None
    drift_guard: dict | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def _save_reference_merge(
    model_dir: Path, output_dir: Path, reference_dirs: list[Path], weight: float, report: MitigationReport, exclude
) -> None:
    """Write the input with every floating-point weight merged toward the references' mean (read
    from disk tensor by tensor: no model is built, so this costs about one copy of the checkpoint
    and one read of each reference)."""
    with reference.open_references(reference_dirs) as tensor:
        report.mitigated, report.reason = True, "mitigated"
        changes = reference.merge_changes(model_dir, tensor, weight)
        modelio.save_mitigated(model_dir, output_dir, changes, {REPORT_FILE: report.to_json()}, exclude)


def _rewrite_report(output_dir: Path, report: MitigationReport) -> None:
    """The report again, now that its ``seconds`` include the save: the model is already in
    place, so a failure here costs the timing, never the output."""
    try:
        atomic_write_text(output_dir / REPORT_FILE, report.to_json())
    except OSError as err:
        log.warning("could not add the save's seconds to %s (%s)", REPORT_FILE, err)


UNFINISHED = (
    "unfinished: these are the input's own files, written before mitigation started; "
    "the run stopped before it could replace them (killed, out of host memory or out of time)"
)


def run(
    model_dir: str | Path,
    output_dir: str | Path,
    meta: Metaparameters,
    learned_dir: str | Path,
    trust_remote_code: bool = False,
    peft_dir: str | Path | None = None,
    round_training_dir: str | Path | None = None,
) -> MitigationReport:
    """The ``mitigate`` job. Raises :class:`TeleLoRAError` only for bad input, before anything
    is written.

    Once the folder has passed its checks, the input's own files go to ``output_dir`` first
    (hard links where possible: instant), so a loadable model is there even if the process
    is killed. Loading, mitigating and writing then happen; any failure among them (out of
    memory on the GPU or the host, a CUDA error, a model transformers cannot build, a full
    disk) leaves that copy in place with a report saying why."""
    clock = time.time()
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = round(time.time() - clock, 3)
        clock = time.time()

    model_dir = modelio.resolve_model_dir(model_dir)
    output_dir = Path(output_dir)
    modelio.check_model_dir(model_dir)
    modelio.check_not_replacing(output_dir, model_dir, "--output_dirpath")
    modelio.check_output_dir(output_dir)
    exclude = []
    if peft_dir is not None:
        for protected in (model_dir, output_dir):
            modelio.check_not_replacing(Path(peft_dir), protected, "--peft_dirpath")
        modelio.check_output_dir(Path(peft_dir))
        exclude.append(Path(peft_dir))
    architecture = modelio.round_config(model_dir).get("model_architecture")
    tokenizer = modelio.load_tokenizer(model_dir, trust_remote_code)
    reference_dirs = []
    if round_training_dir is not None and meta.reference_weight > 0:
        try:  # a round the harness passes that cannot be read must not cost the output
            reference_dirs = reference.find_references(Path(round_training_dir), model_dir, meta.reference_count)
        except Exception as err:
            log.error("NO REFERENCE MODEL: --round_training_dataset_dirpath cannot be used (%s); "
                      "running the generators instead", err)  # fmt: skip
        if reference_dirs and peft_dir is not None:
            raise TeleLoRAError(
                f"--peft_dirpath exports a low-rank change, but the merge toward {', '.join(map(str, reference_dirs))} "
                "changes every weight in full: drop --peft_dirpath, or --round_training_dataset_dirpath, or set "
                "reference_weight 0"
            )

    report = MitigationReport(mitigated=False, reason=UNFINISHED, model_architecture=architecture, seconds=seconds)
    if reference_dirs:
        report.method, report.reference_models = "reference_merge", [str(d) for d in reference_dirs]
        report.reference_weight = meta.reference_weight
    try:
        modelio.copy_model_files(model_dir, output_dir, {REPORT_FILE: report.to_json()}, exclude=exclude)
    except OSError as err:
        raise TeleLoRAError(f"the output folder {output_dir} cannot be written ({err})") from err
    lap("copy_input")

    mitigation = None
    try:
        if reference_dirs:
            _save_reference_merge(model_dir, output_dir, reference_dirs, meta.reference_weight, report, exclude)
            lap("merge_and_save")
            _rewrite_report(output_dir, report)
            log.info("wrote %s (merged toward the mean of %s; seconds %s)", output_dir,
                     ", ".join(map(str, reference_dirs)), seconds)  # fmt: skip
            return report
        device, dtype = modelio.pick_device_dtype(meta.device, meta.dtype, model_dir)
        report.device, report.compute_dtype = str(device), str(dtype).removeprefix("torch.")
        model = modelio.load_model(model_dir, device, dtype, trust_remote_code)
        log.info("loaded %s (%s) on %s in %s", model_dir, architecture or type(model).__name__, device, dtype)
        lap("load")
        torch.manual_seed(meta.seed)
        bank, info = load_bank(learned_dir, meta)
        bank.to(device)
        mitigation = plan_mitigation(model, tokenizer, bank, load_texts(learned_dir), meta, info.get("layer_ranges"))
        report.num_layers_adapted = len(mitigation.delta)
        report.layer_bound = dataclasses.asdict(mitigation.layer_bound)
        report.drift_guard = dataclasses.asdict(mitigation.drift_guard)
        lap("mitigate")
        changed = [layer for layer in mitigation.layers if layer.name in mitigation.delta.factors]
        names = modelio.checkpoint_names(model_dir, {f"{x.name}.weight": tuple(x.module.weight.shape) for x in changed})
        changes = {names[f"{x.name}.weight"]: modelio.add_low_rank(*mitigation.delta.factors[x.name]) for x in changed}
        report.mitigated, report.reason = True, "mitigated"
        modelio.save_mitigated(model_dir, output_dir, changes, {REPORT_FILE: report.to_json()}, exclude)
        lap("save")
        _rewrite_report(output_dir, report)
    except Exception as err:  # anything after the checks: the input's own files stay in the output
        report.mitigated, report.reason = False, f"{type(err).__name__}: {err}"
        log.error("MITIGATION FAILED; THE OUTPUT HOLDS THE UNCHANGED INPUT MODEL: %s", report.reason)
        try:
            atomic_write_text(output_dir / REPORT_FILE, report.to_json())
        except OSError as write_err:
            log.error("could not update %s (%s); the unchanged model is in place", REPORT_FILE, write_err)
    log.info("wrote %s (mitigated: %s; seconds %s)", output_dir, report.mitigated, seconds)
    if report.mitigated and peft_dir is not None:
        try:
            export_peft(mitigation.delta, peft_dir, base_model_name=str(model_dir))
        except Exception as err:
            message = f"the mitigated model is saved, but the PEFT export to {peft_dir} failed: {err}"
            raise TeleLoRAError(message) from err
    return report
