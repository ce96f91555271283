"""Meta-training of the generators across LLMs (the ``configure`` mode).

One iteration, after DESIGN.md section 3, with memory bounded by one generator pass plus a
LoRA fine-tune of one LLM:

1. pick an LLM; without autograd, generate ``U, V`` for every layer from its reference
   activations (computed once per model: the LLM is frozen);
2. make ``U, V`` leaf tensors, run the LLM forward-backward with the adapters hooked in
   (gradient checkpointing on) to get ``dL/dU, dL/dV``;
3. for each layer in turn, re-run its generator with autograd and backpropagate
   ``sum(U * dL/dU) + sum(V * dL/dV)``, which accumulates exactly ``dL/dtheta``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import random
from pathlib import Path

import torch
from tqdm import tqdm

from telelora import activations, alignment, learned, modelio
from telelora.adapters import Adapter, applied
from telelora.architectures import AdaptedLayer, find_adapted_layers
from telelora.chat import pad_id
from telelora.errors import TeleLoRAError
from telelora.generator import GeneratorBank
from telelora.metaparameters import Metaparameters
from telelora.texts import load as load_texts

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainingModel:
    """A training LLM with everything an iteration needs; the LLM itself stays on the CPU."""

    model_dir: Path
    model: torch.nn.Module
    tokenizer: object
    layers: list[AdaptedLayer]
    reference_activations: dict[str, torch.Tensor]
    examples: list[alignment.Example]
    triggers: list[str]


def list_model_dirs(configure_models_dir: str | Path | None, extra_model_dirs: list[str] | None) -> list[Path]:
    """Model folders of a round's ``models/`` folder (or the round folder) plus extra ones."""
    dirs: list[Path] = []
    if configure_models_dir:
        root = Path(configure_models_dir)
        if not root.is_dir():
            raise TeleLoRAError(f"--configure_models_dirpath {root} is not a folder")
        if (root / "models").is_dir():
            root = root / "models"
        dirs += sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p / "config.json").is_file())
    dirs += [Path(d) for d in extra_model_dirs or []]
    if not dirs:
        raise TeleLoRAError(
            "no model folders to train on: --configure_models_dirpath holds no folder with a config.json "
            "and no --extra_model_dirpaths were given"
        )
    return dirs


def prepare(model_dir: Path, meta: Metaparameters, texts, seed: int) -> TrainingModel:
    """Load one training model on the CPU and build its activations and alignment data."""
    device, dtype = modelio.pick_device_dtype(meta.dtype)
    tokenizer = modelio.load_tokenizer(model_dir)
    model = modelio.load_model(model_dir, device, dtype)
    layers = find_adapted_layers(model, meta.target_projections)
    acts = activations.collect(
        model,
        tokenizer,
        layers,
        texts.reference[: meta.num_reference_texts],
        meta.activation_tokens,
        meta.activation_batch_size,
        meta.max_tokens,
        seed,
    )
    triggers = alignment.declared_triggers(model_dir)
    examples = alignment.build_examples(
        model,
        tokenizer,
        texts.alignment,
        triggers,
        meta.alignment_examples_per_model,
        meta.answer_tokens,
        meta.max_tokens,
        meta.activation_batch_size,
        seed,
    )
    model.to("cpu")
    return TrainingModel(model_dir, model, tokenizer, layers, {k: v.cpu() for k, v in acts.items()}, examples, triggers)


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing (the method was renamed in transformers 5.2x)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def train_step(
    bank: GeneratorBank, item: TrainingModel, batch: list[alignment.Example], meta: Metaparameters, device
) -> float:
    """One three-phase iteration; leaves the generators' gradients in ``.grad``."""
    acts = {name: x.to(device) for name, x in item.reference_activations.items()}
    # phase 1: adapters without autograd, as leaf tensors
    with torch.no_grad():
        adapters = {}
        for layer in item.layers:
            u, v = bank(layer.projection_type, acts[layer.name], layer.depth, meta.rank)
            adapters[layer.name] = Adapter(u.requires_grad_(), v.requires_grad_())
    # phase 2: LLM forward-backward to the adapters only
    inputs = alignment.collate(batch, pad_id(item.tokenizer), device)
    item.model.train()  # activates gradient checkpointing; training models have no dropout we rely on
    with applied(item.layers, adapters, step_size=1.0):  # hooks stay on for checkpoint recomputation
        loss = alignment.answer_loss(item.model, inputs)
        loss.backward()
    item.model.eval()
    # phase 3: one generator re-forward per layer, pushing dL/dU and dL/dV into theta
    for layer in item.layers:
        a = adapters[layer.name]
        if a.u.grad is None:
            continue
        u, v = bank(layer.projection_type, acts[layer.name], layer.depth, meta.rank)
        ((u * a.u.grad).sum() + (v * a.v.grad).sum()).backward()
    return float(loss.detach())


def configure(
    model_dirs: list[Path],
    meta: Metaparameters,
    texts_dir: str | Path,
    out_dir: str | Path,
    scratch_dir: str | Path,
) -> dict:
    """Meta-train the generators on ``model_dirs`` and write ``out_dir`` atomically."""
    random.seed(meta.seed)
    torch.manual_seed(meta.seed)
    rng = random.Random(meta.seed)
    device, _ = modelio.pick_device_dtype(meta.dtype)
    texts = load_texts(texts_dir)
    items: list[TrainingModel] = []
    for index, model_dir in enumerate(tqdm(model_dirs, desc="preparing models")):
        try:
            items.append(prepare(model_dir, meta, texts, meta.seed + index))
        except TeleLoRAError as err:
            log.warning("skipping %s: %s", model_dir, err)
    if not items:
        raise TeleLoRAError("none of the training model folders could be used (see the warnings above)")
    for item in items:
        enable_checkpointing(item.model)

    bank = GeneratorBank.from_metaparameters(meta).to(device)
    optimizer = torch.optim.AdamW(bank.parameters(), lr=meta.learning_rate)
    losses: list[float] = []
    progress = tqdm(range(meta.train_iterations), desc="meta-training")
    current: TrainingModel | None = None
    for _ in progress:
        item = rng.choice(items)
        if item is not current:  # one LLM on the accelerator at a time
            if current is not None:
                current.model.to("cpu")
            item.model.to(device)
            current = item
        batch = rng.sample(item.examples, min(meta.train_batch_size, len(item.examples)))
        optimizer.zero_grad(set_to_none=True)
        loss = train_step(bank, item, batch, meta, device)
        grad_norm = torch.nn.utils.clip_grad_norm_(bank.parameters(), 1.0)
        if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
            log.warning("non-finite loss or gradient on %s; skipping this update", item.model_dir.name)
            continue
        optimizer.step()
        losses.append(loss)
        progress.set_postfix(loss=f"{loss:.4f}", model=item.model_dir.name)

    if not losses:
        raise TeleLoRAError("every meta-training update was non-finite; lower learning_rate")
    Path(scratch_dir).mkdir(parents=True, exist_ok=True)
    (Path(scratch_dir) / "configure_losses.json").write_text(json.dumps(losses))
    tail = losses[-10:]
    provenance = {
        "trained_on": [
            {"model_dir": str(i.model_dir), "architecture": type(i.model).__name__, "known_triggers": len(i.triggers)}
            for i in items
        ],
        "iterations": meta.train_iterations,
        "first_loss": losses[0],
        "final_loss_mean_last_10": sum(tail) / len(tail),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "metaparameters": meta.to_dict(),
        "generator_parameters": learned.count_parameters(bank),
    }
    learned.write(bank, provenance, texts_dir, out_dir)
    log.info("wrote %s (loss %.4f -> %.4f)", out_dir, losses[0], provenance["final_loss_mean_last_10"])
    return provenance
