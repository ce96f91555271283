"""Zero-shot mitigation: reference activations -> generated adapters -> merged weights.

``mitigate_model`` runs K steps; each recomputes the activations of the model as merged so
far, generates one adapter per layer and composes ``W <- W (I + alpha V^T U)``.
``run`` is the NIST job around it: it checks its inputs before loading anything, and once
the input model has loaded it *always* leaves a loadable model + tokenizer behind, the
unchanged one (with a loud log line) if anything in the mitigation fails.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from telelora import activations, modelio
from telelora.adapters import Adapter, LowRankDelta, export_peft
from telelora.architectures import AdaptedLayer, find_adapted_layers
from telelora.errors import TeleLoRAError
from telelora.generator import GeneratorBank
from telelora.learned import load_bank
from telelora.metaparameters import Metaparameters
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


def mitigate_model(model, tokenizer, bank: GeneratorBank, texts: list[str], meta: Metaparameters) -> LowRankDelta:
    """Merge K generated adapter steps into ``model`` in place; return the equivalent LoRA.

    Steps after the first read the activations of the model as changed so far (applied by
    hooks, in float32); the weights are written once at the end.
    """
    layers = find_adapted_layers(model, meta.target_projections)
    texts = texts[: meta.num_reference_texts]
    if len(texts) < meta.rank:
        raise ValueError(f"rank {meta.rank} needs at least as many reference texts, but only {len(texts)} ship")
    if len(texts) < meta.num_reference_texts:
        log.warning("only %d reference texts ship; using all of them", len(texts))
    delta = LowRankDelta()
    for step in tqdm(range(meta.mitigation_steps), desc="mitigation steps", disable=meta.mitigation_steps == 1):
        with delta.applied(layers):
            adapters = generate_adapters(bank, model, tokenizer, layers, texts, meta, seed=meta.seed + step)
        delta.add_step(layers, adapters, meta.step_size)
    delta.merge(layers)
    for layer in layers:
        if not torch.isfinite(layer.module.weight).all():
            raise FloatingPointError(f"merged weight of {layer.name} is not finite")
    log.info("merged %d adapted layers over %d step(s)", len(delta), meta.mitigation_steps)
    return delta


@dataclasses.dataclass
class MitigationReport:
    mitigated: bool
    reason: str
    model_architecture: str | None
    num_layers_adapted: int
    seconds: dict[str, float]  # load and mitigate (the log line adds save)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def run(
    model_dir: str | Path,
    output_dir: str | Path,
    meta: Metaparameters,
    learned_dir: str | Path,
    trust_remote_code: bool = False,
    peft_dir: str | Path | None = None,
) -> MitigationReport:
    """The ``mitigate`` job. Raises :class:`TeleLoRAError` only before the model has loaded."""
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
    if peft_dir is not None:
        for protected in (model_dir, output_dir):
            modelio.check_not_replacing(Path(peft_dir), protected, "--peft_dirpath")
        modelio.check_output_dir(Path(peft_dir))
    architecture = modelio.round_config(model_dir).get("model_architecture")
    device, dtype = modelio.pick_device_dtype(meta.dtype)
    tokenizer = modelio.load_tokenizer(model_dir, trust_remote_code)
    model = modelio.load_model(model_dir, device, dtype, trust_remote_code)
    log.info("loaded %s (%s) on %s in %s", model_dir, architecture or type(model).__name__, device, dtype)
    lap("load")

    torch.manual_seed(meta.seed)
    delta, failure = None, None
    try:
        bank, _ = load_bank(learned_dir, meta)
        bank.to(device)
        texts = load_texts(learned_dir).reference
        delta = mitigate_model(model, tokenizer, bank, texts, meta)
    except Exception as err:  # any failure after loading: keep the unchanged model
        failure = f"{type(err).__name__}: {err}"
        log.error("MITIGATION FAILED, SAVING THE UNCHANGED MODEL: %s", failure)
    lap("mitigate")

    report = MitigationReport(
        mitigated=failure is None,
        reason=failure or "mitigated",
        model_architecture=architecture,
        num_layers_adapted=0 if delta is None else len(delta),
        seconds=seconds,
    )
    if failure is None:
        modelio.save_model(model, tokenizer, output_dir, extra_files={REPORT_FILE: report.to_json()})
    else:  # the input's own files: no reload, no second chance to run out of memory
        del model
        modelio.copy_model_files(model_dir, output_dir, extra_files={REPORT_FILE: report.to_json()})
    lap("save")
    log.info("wrote %s (mitigated: %s; seconds %s)", output_dir, report.mitigated, seconds)
    if delta is not None and peft_dir is not None:
        try:
            export_peft(delta, peft_dir, base_model_name=str(model_dir))
        except Exception as err:
            message = f"the mitigated model is saved, but the PEFT export to {peft_dir} failed: {err}"
            raise TeleLoRAError(message) from err
    return report
