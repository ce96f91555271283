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
from telelora.adapters import Adapter, PeftDelta, export_peft, merge
from telelora.architectures import AdaptedLayer, find_adapted_layers
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


def mitigate_model(model, tokenizer, bank: GeneratorBank, texts: list[str], meta: Metaparameters) -> PeftDelta:
    """Merge K generated adapter steps into ``model`` in place; return the equivalent LoRA."""
    layers = find_adapted_layers(model, meta.target_projections)
    texts = texts[: meta.num_reference_texts]
    if len(texts) < meta.num_reference_texts:
        log.warning("only %d reference texts ship; using all of them", len(texts))
    delta = PeftDelta()
    for step in tqdm(range(meta.mitigation_steps), desc="mitigation steps", disable=meta.mitigation_steps == 1):
        adapters = generate_adapters(bank, model, tokenizer, layers, texts, meta, seed=meta.seed + step)
        merge(layers, adapters, meta.step_size, delta)
    for layer in layers:
        if not torch.isfinite(layer.module.weight).all():
            raise FloatingPointError(f"merged weight of {layer.name} is not finite")
    log.info(
        "merged %d adapters over %d step(s) into %d layers", len(delta.factors), meta.mitigation_steps, len(layers)
    )
    return delta


@dataclasses.dataclass
class MitigationReport:
    mitigated: bool
    reason: str
    model_architecture: str | None
    num_layers_adapted: int
    seconds: dict[str, float]  # load, mitigate, save

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
    modelio.check_output_dir(output_dir)
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
    if failure is not None:  # outside the except block, so the traceback no longer pins memory
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = modelio.load_model(model_dir, device, dtype, trust_remote_code)
    lap("mitigate")

    report = MitigationReport(
        mitigated=failure is None,
        reason=failure or "mitigated",
        model_architecture=architecture,
        num_layers_adapted=0 if delta is None else len(delta.factors),
        seconds=seconds,
    )
    modelio.save_model(model, tokenizer, output_dir, extra_files={REPORT_FILE: report.to_json()})
    if delta is not None and peft_dir is not None:
        export_peft(delta, peft_dir, base_model_name=str(model_dir))
    lap("save")
    log.info("wrote %s (mitigated: %s; seconds %s)", output_dir, report.mitigated, seconds)
    return report
