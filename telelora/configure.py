"""Meta-training of the generators across LLMs (the ``configure`` mode).

One iteration, after DESIGN.md section 3, with memory bounded by one generator pass plus a
LoRA fine-tune of one LLM:

1. pick an LLM; without autograd, generate ``U, V`` for every layer from its reference
   activations (computed once per model: the LLM is frozen);
2. make ``U, V`` leaf tensors, run the LLM forward-backward with the adapters hooked in
   (gradient checkpointing on) to get ``dL/dU, dL/dV``;
3. for each layer in turn, re-run its generator with autograd and backpropagate
   ``sum(U * dL/dU) + sum(V * dL/dV)``, which accumulates exactly ``dL/dtheta``.

Only the picked LLM is on the accelerator; the others wait in CPU memory up to a budget
and are re-loaded from disk beyond it. Each model's reference activations and alignment
data (its own greedy answers, the slow part) are cached in the scratch folder, so a
resumed or repeated run does not regenerate them. Under ``torchrun`` every rank trains on
its own share of the LLMs and the gradients are averaged (``telelora.distributed``).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import random
import time
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from telelora import activations, alignment, checkpoint, guard, learned, modelio, validation
from telelora.adapters import Adapter, applied
from telelora.architectures import AdaptedLayer, find_adapted_layers
from telelora.chat import pad_id, stop_ids
from telelora.distributed import World
from telelora.errors import TeleLoRAError
from telelora.generator import GeneratorBank
from telelora.io_utils import atomic_write_text
from telelora.metaparameters import Metaparameters, meta_training_knobs
from telelora.texts import TEXTS_FILE, Texts
from telelora.texts import load as load_texts

log = logging.getLogger(__name__)
DATA_VERSION = 6  # bump when the cached per-model data changes meaning
MONITOR_FILE = "monitor.json"  # per-model monitor losses and validation figures, next to losses.json
NEEDS_CHANGE = 1e-3  # a monitor loss above this with no adapter: the model departs from its trigger-free answers


@dataclasses.dataclass
class TrainingModel:
    """What an iteration needs of one training LLM, apart from the LLM itself."""

    model_dir: Path
    reference_activations: dict[str, torch.Tensor]  # layer name -> X (N x H), float32, CPU
    examples: list[alignment.Example]
    triggers: list[str]
    pad_id: int
    architecture: str
    layer_types: dict[str, tuple[str, float]]  # layer name -> (projection type, depth)


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    layers: list[AdaptedLayer]
    bytes: int


def list_model_dirs(
    configure_models_dir: str | Path | None,
    extra_model_dirs: list[str] | None,
    flag: str = "--configure_models_dirpath",
) -> list[Path]:
    """Model folders of a round's ``models/`` folder (or the round folder) plus extra ones;
    ``flag`` names the option in errors."""
    dirs: list[Path] = []
    if configure_models_dir:
        dirs += modelio.round_model_dirs(configure_models_dir, flag)
    dirs += [Path(d) for d in extra_model_dirs or []]
    if not dirs:
        raise TeleLoRAError(
            f"no model folders: {flag} holds no folder with a config.json"
            + (" and no --extra_model_dirpaths were given" if flag == "--configure_models_dirpath" else "")
        )
    return dirs


def load_llm(model_dir: Path, meta: Metaparameters, device) -> LoadedModel:
    """The frozen LLM with gradient checkpointing on, dropout off, and its adapted layers."""
    _, dtype = modelio.pick_device_dtype(meta.device, meta.dtype)
    modelio.check_model_dir(model_dir)
    model = modelio.load_model(model_dir, device, dtype)
    layers = find_adapted_layers(model, meta.target_projections)
    modelio.enable_checkpointing(model)
    modelio.disable_dropout(model)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return LoadedModel(model, layers, size)


def seed_for(model_dir: Path, seed: int) -> int:
    """A model's data seed from its folder name: adding a model to a round leaves the others' data alone."""
    return seed + zlib.crc32(model_dir.name.encode())


def _data_key(model_dir: Path, meta: Metaparameters, texts: Texts, seed: int, device) -> str:
    """What the cached data depends on: the model's files, the texts and the knobs that shape the data."""
    answerer = alignment.trigger_free_model(model_dir)
    stats = [
        (str(folder.resolve()), p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for folder in sorted({model_dir, answerer or model_dir})
        for p in sorted(folder.iterdir())
        if p.is_file()
    ]
    knobs = {
        k: getattr(meta, k)
        for k in (
            "num_reference_texts", "activation_tokens", "target_projections", "alignment_examples_per_model",
            "jailbreak_rate", "clean_prompt_share", "max_tokens", "answer_tokens", "activation_batch_size", "dtype",
        )
    }  # fmt: skip
    payload = [DATA_VERSION, str(model_dir.resolve()), stats, knobs, texts_digest(texts), seed, device.type]
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:24]


def texts_digest(texts: Texts) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(texts)).encode()).hexdigest()[:16]


def prepare(
    model_dir: Path, meta: Metaparameters, texts: Texts, seed: int, device, scratch_dir: Path | None = None
) -> tuple[TrainingModel, LoadedModel | None]:
    """One training model's activations and alignment data, from the scratch cache when
    present (then the LLM is not loaded: the second value is None)."""
    config = modelio.check_model_dir(model_dir)
    architecture = (config.get("architectures") or ["?"])[0]
    cache = None
    if scratch_dir is not None:
        cache = Path(scratch_dir) / "configure" / "data" / f"{_data_key(model_dir, meta, texts, seed, device)}.pt"
        if cache.is_file():
            try:
                saved = torch.load(cache, map_location="cpu", weights_only=True)
                examples = [alignment.Example(*fields) for fields in saved["examples"]]
                layer_types = {name: (t, float(d)) for name, (t, d) in saved["layer_types"].items()}
                item = TrainingModel(
                    model_dir,
                    saved["activations"],
                    examples,
                    saved["triggers"],
                    saved["pad_id"],
                    architecture,
                    layer_types,
                )
                log.info("%s: alignment data and activations from %s", model_dir.name, cache)
                return item, None
            except Exception as err:  # a damaged cache is rebuilt, never trusted
                log.warning("%s: ignoring unreadable cache %s (%s)", model_dir.name, cache, err)
    tokenizer = modelio.load_tokenizer(model_dir)
    loaded = load_llm(model_dir, meta, device)
    acts = activations.collect(
        loaded.model,
        tokenizer,
        loaded.layers,
        texts.reference[: meta.num_reference_texts],
        meta.activation_tokens,
        meta.activation_batch_size,
        meta.max_tokens,
        seed,
    )
    triggers = alignment.declared_triggers(model_dir)
    source = alignment.trigger_free_model(model_dir)
    if source is None:
        answerer = None
    elif source == model_dir:
        answerer = loaded.model
    else:  # a Trojan's clean base, only for the answers
        answerer = modelio.load_model(source, device, next(loaded.model.parameters()).dtype)
    examples = alignment.build_examples(
        loaded.model,
        tokenizer,
        texts.alignment,
        triggers,
        meta.alignment_examples_per_model,
        meta.answer_tokens,
        meta.max_tokens,
        meta.activation_batch_size,
        seed,
        texts.jailbreak_templates,
        meta.jailbreak_rate,
        meta.clean_prompt_share,
        answerer,
    )
    del answerer
    log.info(
        "%s: poisoned prompts answered by %s; %.0f%% of answers end within %d tokens",
        model_dir.name,
        "its own answers to the clean prompts" if source is None else source.name,
        100 * alignment.reached_end(examples, stop_ids(loaded.model, tokenizer)),
        meta.answer_tokens,
    )
    acts = {k: v.cpu() for k, v in acts.items()}
    layer_types = {layer.name: (layer.projection_type, layer.depth) for layer in loaded.layers}
    known = [t.text for t in triggers]
    item = TrainingModel(model_dir, acts, examples, known, pad_id(tokenizer), architecture, layer_types)
    if cache is not None:
        saved = {
            "activations": item.reference_activations,
            "examples": [(e.input_ids, e.labels, e.target_ids, e.target_probs) for e in examples],
            "triggers": known,
            "pad_id": item.pad_id,
            "layer_types": {name: [t, d] for name, (t, d) in layer_types.items()},
        }
        checkpoint.save(cache, saved)
    return item, loaded


class ModelPool:
    """The training LLMs: the picked one on the accelerator, up to ``cpu_budget_bytes``
    of the others parked in CPU memory, the rest re-loaded from disk when picked."""

    def __init__(self, meta: Metaparameters, device, cpu_budget_bytes: float):
        self.meta, self.device, self.budget = meta, device, cpu_budget_bytes
        self.parked: dict[Path, LoadedModel] = {}  # insertion order = least recently used first
        self.current: tuple[Path, LoadedModel] | None = None

    def offer(self, model_dir: Path, loaded: LoadedModel | None) -> None:
        """Keep an LLM that is already loaded (after ``prepare``) if the budget allows."""
        if loaded is not None:
            self._park(model_dir, loaded)

    def get(self, model_dir: Path) -> LoadedModel:
        """The LLM of ``model_dir`` on the accelerator (raises TeleLoRAError if it no longer loads)."""
        if self.current is not None and self.current[0] == model_dir:
            return self.current[1]
        if self.current is not None:
            self._park(*self.current)
            self.current = None
        loaded = self.parked.pop(model_dir, None)
        try:
            if loaded is None:
                loaded = load_llm(model_dir, self.meta, self.device)
            else:
                loaded.model.to(self.device)
        except torch.OutOfMemoryError as err:
            raise TeleLoRAError(f"{model_dir}: does not fit on {self.device} ({err})") from err
        self.current = (model_dir, loaded)
        return loaded

    def _park(self, model_dir: Path, loaded: LoadedModel) -> None:
        if loaded.bytes > self.budget:
            return  # dropped: re-loaded from disk when picked again
        loaded.model.to("cpu")
        self.parked[model_dir] = loaded
        while sum(m.bytes for m in self.parked.values()) > self.budget:
            self.parked.pop(next(iter(self.parked)))


def train_step(
    bank: GeneratorBank, item: TrainingModel, llm: LoadedModel, batch: list[alignment.Example], meta, device
) -> float:
    """One three-phase pass; *adds* ``dL/dtheta`` of this batch's mean loss to ``.grad``."""
    acts = {name: x.to(device) for name, x in item.reference_activations.items()}
    # phase 1: adapters without autograd, as leaf tensors
    adapters = generated_adapters(bank, item, llm, meta, device)
    for adapter in adapters.values():
        adapter.u.requires_grad_()
        adapter.v.requires_grad_()
    # phase 2: LLM forward-backward to the adapters only
    inputs = alignment.collate(batch, item.pad_id, device)
    llm.model.train()  # activates gradient checkpointing; training models have no dropout we rely on
    with applied(llm.layers, adapters, step_size=1.0):  # hooks stay on for checkpoint recomputation
        loss = alignment.distill_loss(llm.model, inputs)
        loss.backward()
    llm.model.eval()
    # phase 3: one generator re-forward per layer, pushing dL/dU and dL/dV into theta
    for layer in llm.layers:
        a = adapters[layer.name]
        if a.u.grad is None:
            continue
        u, v = bank(layer.projection_type, acts[layer.name], layer.depth, meta.rank)
        ((u * a.u.grad).sum() + (v * a.v.grad).sum()).backward()
    return float(loss.detach())


@torch.no_grad()
def generated_adapters(bank: GeneratorBank, item: TrainingModel, llm: LoadedModel, meta, device) -> dict[str, Adapter]:
    """Every adapted layer's adapter from the current generators, without autograd."""
    adapters = {}
    for layer in llm.layers:
        x = item.reference_activations[layer.name].to(device)
        adapters[layer.name] = Adapter(*bank(layer.projection_type, x, layer.depth, meta.rank))
    return adapters


@torch.no_grad()
def monitor_losses(
    bank: GeneratorBank | None, items: list[TrainingModel], pool: ModelPool, meta, device
) -> dict[str, float]:
    """Each training model's mean loss over all its answer tokens (in ``train_batch_size``
    batches) under the current generators, or with no adapter at all when ``bank`` is None:
    the identity, 0 for a model that needs no change, above 0 where a Trojan fires. A
    fixed set, unlike the random training batches, makes two steps' losses comparable, and
    all of it, unlike one batch, holds the few examples where a Trojan fires. Batches are
    weighted by their answer tokens, so the figure does not depend on the batch size."""
    losses = {}
    for item in items:
        try:
            llm = pool.get(item.model_dir)
        except TeleLoRAError:
            continue  # dropped with a warning when training picks it
        adapters = {} if bank is None else generated_adapters(bank, item, llm, meta, device)
        size, total = meta.train_batch_size, 0.0
        with applied(llm.layers, adapters, step_size=1.0):
            for start in range(0, len(item.examples), size):
                chunk = item.examples[start : start + size]
                batch = alignment.collate(chunk, item.pad_id, device)
                total += float(alignment.distill_loss(llm.model, batch)) * sum(len(e.answer) for e in chunk)
        losses[item.model_dir.name] = total / sum(len(e.answer) for e in item.examples)
    return losses


def meta_step(
    bank: GeneratorBank,
    optimizer: torch.optim.Optimizer,
    work: list[tuple[TrainingModel, LoadedModel, list[alignment.Example]]],
    meta: Metaparameters,
    device,
    world: World,
) -> tuple[list[float], float, float]:
    """One optimiser update from this rank's ``work`` and every other rank's: gradients are
    averaged over all (model, batch) pairs of all ranks. Returns this rank's losses, the
    mean loss over all ranks and the gradient norm; when either of the last two is not
    finite the update is skipped, on every rank alike."""
    optimizer.zero_grad(set_to_none=True)
    losses = [train_step(bank, item, llm, batch, meta, device) for item, llm, batch in work]
    total = world.average_gradients(bank, len(work))
    if total == 0:
        raise TeleLoRAError("no rank has a usable training model left (see the warnings above)")
    mean_loss = world.mean(sum(losses) / len(losses) if losses else 0.0, len(losses))
    grad_norm = float(torch.nn.utils.clip_grad_norm_(bank.parameters(), 1.0))
    if math.isfinite(mean_loss) and math.isfinite(grad_norm):
        optimizer.step()
    return losses, mean_loss, grad_norm


def _fingerprint(
    meta: Metaparameters, model_dirs: list[Path], texts: Texts, world: World, validation_dirs: list[Path] = ()
) -> dict:
    knobs = meta_training_knobs(meta)
    models = [str(d.resolve()) for d in model_dirs]
    held_out = [str(d.resolve()) for d in validation_dirs]
    return {
        "metaparameters": knobs,
        "models": models,
        "validation_models": held_out,
        "texts": texts_digest(texts),
        "world_size": world.size,
    }


def configure(
    model_dirs: list[Path],
    meta: Metaparameters,
    texts_dir: str | Path,
    out_dir: str | Path,
    scratch_dir: str | Path,
    resume: bool = False,
    checkpoint_interval: int = 25,
    cpu_cache_gb: float = 32.0,
    world: World | None = None,
    validation_dirs: list[Path] = (),
) -> dict:
    """Meta-train the generators on ``model_dirs`` and write ``out_dir`` atomically.

    With ``validation_dirs``, the strict Fidelity of those models is measured at the start,
    at every checkpoint and at the end (``telelora.validation``), and the generators of the
    best of those steps are the ones written; without, the last step's."""
    world = world or World()
    show = world.is_main  # one set of progress bars, not one per rank
    started = time.time()
    random.seed(meta.seed)
    torch.manual_seed(meta.seed)
    device, _ = modelio.pick_device_dtype(meta.device, meta.dtype)
    texts = load_texts(texts_dir)
    if meta.jailbreak_rate > 0 and not texts.jailbreak_templates:
        log.warning("%s has no jailbreak templates: alignment data gets triggers only", Path(texts_dir) / TEXTS_FILE)
    scratch = Path(scratch_dir)
    pool = ModelPool(meta, device, cpu_cache_gb * 2**30)
    items: list[TrainingModel] = []
    shard = world.shard(model_dirs)
    for model_dir in tqdm(shard, desc="preparing models", disable=not show):
        try:
            item, loaded = prepare(model_dir, meta, texts, seed_for(model_dir, meta.seed), device, scratch)
        except TeleLoRAError as err:
            log.warning("skipping %s: %s", model_dir, err)
            continue
        except Exception as err:  # a tokenizer or chat template that breaks, out of memory...
            log.warning("skipping %s: %s: %s", model_dir, type(err).__name__, err)
            continue
        items.append(item)
        pool.offer(model_dir, loaded)
        del loaded  # a model the pool did not keep must not linger on the accelerator
    per_rank = world.gather(len(items))
    if not all(per_rank):
        where = f" on rank(s) {[r for r, n in enumerate(per_rank) if not n]}" if world.active else ""
        raise TeleLoRAError(
            f"no usable training model{where} (see the warnings above); every process needs at least one"
        )

    held_out = _prepare_validation(world.shard(list(validation_dirs)), meta, show)

    torch.manual_seed(meta.seed)  # the same start whether or not models were loaded above
    bank = GeneratorBank.from_metaparameters(meta).to(device)
    bank.set_graph_budget()  # phase 3 then holds one EinNet block's intermediates of a wide layer at a time
    world.broadcast_parameters(bank)
    optimizer = torch.optim.AdamW(bank.parameters(), lr=meta.learning_rate)
    rng = random.Random(meta.seed * 1000 + world.rank)
    records: list[dict] = []
    # {"identity": {model: loss}, "evaluations": [{"step": s, "losses": {model: loss}}],
    #  with validation models also "unmitigated": {model: figures}, "validation": [{"step", "models", "mean"}]}
    monitor: dict = {}
    best: dict = {}  # the best validated step so far: {"step", "mean", "bank"}
    start_step = 0
    ckpt_path = checkpoint.path_in(scratch)
    fingerprint = _fingerprint(meta, model_dirs, texts, world, validation_dirs)
    if resume:
        state = checkpoint.load(ckpt_path, fingerprint)
        bank.load_state_dict(state["bank"])
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(as_random_state(state["rng"][world.rank]))
        torch.set_rng_state(state["torch_rng"][world.rank])
        records, start_step, monitor = state["records"], state["step"], state.get("monitor") or {}
        best = state.get("best") or {}
        for item in held_out:
            item.validation.pre_asr = monitor.get("unmitigated", {}).get(item.name, {}).get("asr")
        # train on the models that were usable when the checkpoint was written, so the
        # random picks replay exactly (a model failing only now is dropped when picked)
        usable = set(state["usable"][world.rank])
        items = [i for i in items if i.model_dir.name in usable]
        missing = usable - {i.model_dir.name for i in items}
        if missing:
            log.warning("resuming without %s (usable when the checkpoint was written, not now)", sorted(missing))
        log.info("resuming from step %d of %d (%s)", start_step, meta.train_iterations, ckpt_path)

    def evaluate(step: int) -> None:
        """Every model's monitor loss (and validation figures) at ``step``; first, with no
        adapter. Step 0's generators are fresh, which is the identity (V = 0), so it reuses those."""
        if not monitor:
            monitor["identity"] = _gathered(world, monitor_losses(None, items, pool, meta, device))
            monitor["evaluations"] = []
        if step == 0:
            losses = dict(monitor["identity"])
        else:
            losses = _gathered(world, monitor_losses(bank, items, pool, meta, device))
        monitor["evaluations"].append({"step": step, "losses": losses})
        if validation_dirs:
            if "unmitigated" not in monitor:
                monitor["unmitigated"] = _gathered(world, validate(None, held_out, pool, meta, texts, device))
                monitor["validation"] = []
            if step == 0:
                figures = copy.deepcopy(monitor["unmitigated"])
            else:
                figures = _gathered(world, validate(bank, held_out, pool, meta, texts, device))
            mean = validation.mean_strict_fidelity(figures)
            monitor["validation"].append({"step": step, "models": figures, "mean_strict_fidelity": mean})
            log.info("step %d: validation strict Fidelity %.4f over %d models", step, mean, len(figures))
            if not best or (math.isfinite(mean) and not mean <= best["mean"]):
                best.update(step=step, mean=mean, bank=copy.deepcopy(bank.state_dict()))
            monitor["best_step"] = best["step"]
        if world.is_main:
            atomic_write_text(scratch / "configure" / MONITOR_FILE, json.dumps(monitor, indent=1))

    if not monitor:
        evaluate(start_step)

    def save_checkpoint(step: int) -> None:
        rng_states = world.gather(rng.getstate())
        torch_states = world.gather(torch.get_rng_state())
        usable = world.gather([i.model_dir.name for i in items])
        if world.is_main:
            state = {
                "fingerprint": fingerprint,
                "step": step,
                "bank": bank.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": rng_states,
                "torch_rng": torch_states,
                "records": records,
                "monitor": monitor,
                "best": best,
                "usable": usable,
            }
            checkpoint.save(ckpt_path, state)
            atomic_write_text(scratch / "configure" / "losses.json", json.dumps(records, indent=1))
        world.barrier()

    progress = tqdm(range(start_step, meta.train_iterations), desc="meta-training", disable=not show)
    for step in progress:
        tick = time.time()
        work = pick_work(items, pool, rng, meta)
        losses, loss, grad_norm = meta_step(bank, optimizer, work, meta, device, world)
        mine = [[item.model_dir.name, value] for (item, _, _), value in zip(work, losses, strict=True)]
        per_model = [pair for rank_pairs in world.gather(mine) for pair in rank_pairs]
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            log.warning("step %d: non-finite loss or gradient (%s); update skipped", step, per_model)
        seconds = round(time.time() - tick, 3)
        records.append({"step": step, "loss": loss, "grad_norm": grad_norm, "models": per_model, "seconds": seconds})
        progress.set_postfix(loss=f"{loss:.4f}", model=",".join(name for name, _ in per_model))
        del work  # else the previous LLM would stay on the accelerator while the next one loads
        if (step + 1) % checkpoint_interval == 0 and step + 1 < meta.train_iterations:
            evaluate(step + 1)
            save_checkpoint(step + 1)
    if monitor["evaluations"][-1]["step"] != meta.train_iterations:
        evaluate(meta.train_iterations)

    if best:  # the generators that ship are chosen on validation models only
        bank.load_state_dict(best["bank"])
        log.info("shipping the generators of step %d (validation strict Fidelity %.4f)", best["step"], best["mean"])
    world.check_identical(bank)
    finite = [r["loss"] for r in records if math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])]
    if not finite:
        raise TeleLoRAError("every meta-training update was non-finite; lower learning_rate")
    trained_on = [t for rank_items in world.gather(_describe(items)) for t in rank_items]
    provenance = {
        "trained_on": trained_on,
        "iterations": meta.train_iterations,
        "first_loss": finite[0],
        "final_loss_mean_last_10": sum(finite[-10:]) / len(finite[-10:]),
        "per_model_loss": _per_model_loss(monitor, records),
        "validation": _validation_summary(monitor, best),
        "skipped_updates": len(records) - len(finite),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "processes": world.size,
        "seconds": round(time.time() - started, 1),
        "resumed_from_step": start_step if resume else None,
        "metaparameters": meta.to_dict(),
        "generator_parameters": learned.count_parameters(bank),
    }
    norms = [pair for rank_norms in world.gather(adapter_norms(bank, items, meta, device)) for pair in rank_norms]
    ranges = guard.layer_ranges(norms)
    if world.is_main:
        atomic_write_text(scratch / "configure" / "losses.json", json.dumps(records, indent=1))
        learned.write(bank, provenance, texts_dir, out_dir, ranges)
        _log_summary(provenance, out_dir)
        _draw_curves(scratch / "configure")
    world.barrier()
    return provenance


@torch.no_grad()
def adapter_norms(bank: GeneratorBank, items: list[TrainingModel], meta: Metaparameters, device) -> list:
    """``(projection type, ||V^T U||_2)`` of every layer of every training model under the
    trained generators: the range the drift guard bounds unseen models' layers by."""
    norms = []
    for item in items:
        for name, (projection_type, depth) in item.layer_types.items():
            x = item.reference_activations[name].to(device)
            norms.append((projection_type, guard.spectral_norm(Adapter(*bank(projection_type, x, depth, meta.rank)))))
    return norms


@dataclasses.dataclass
class HeldOut:
    """A validation model: its fixed prompts and its tokenizer (the LLM comes from the pool)."""

    name: str
    validation: validation.ValidationModel
    tokenizer: object


def _prepare_validation(model_dirs: list[Path], meta: Metaparameters, show: bool) -> list[HeldOut]:
    """This rank's validation models; a folder that cannot be validated on is one clear error
    (a silent skip would change what the shipped checkpoint is chosen on)."""
    held_out = []
    for model_dir in tqdm(model_dirs, desc="preparing validation models", disable=not show or not model_dirs):
        modelio.check_model_dir(model_dir)
        item = validation.load_validation_model(model_dir, meta.validation_prompts)
        held_out.append(HeldOut(model_dir.name, item, modelio.load_tokenizer(model_dir)))
    return held_out


def validate(
    bank: GeneratorBank | None, held_out: list[HeldOut], pool: ModelPool, meta: Metaparameters, texts: Texts, device
) -> dict[str, dict[str, float]]:
    """Each validation model's ASR, agreement and strict Fidelity under the generators'
    change (with ``bank`` None: unchanged, which fixes its unmitigated ASR)."""
    reference = texts.reference[: meta.num_reference_texts]
    figures = {}
    for item in held_out:
        llm = pool.get(item.validation.model_dir)
        figures[item.name] = validation.measure(
            bank, item.validation, llm.model, item.tokenizer, llm.layers, reference, meta
        )
    return figures


def pick_work(items: list[TrainingModel], pool: ModelPool, rng: random.Random, meta: Metaparameters) -> list:
    """This rank's (model, LLM, batch) for one step; a model that no longer loads is dropped
    with a warning (and the rank contributes nothing once none is left)."""
    while items:
        item = rng.choice(items)
        batch = rng.sample(item.examples, min(meta.train_batch_size, len(item.examples)))
        try:
            return [(item, pool.get(item.model_dir), batch)]
        except TeleLoRAError as err:
            log.warning("dropping %s from training: it no longer loads (%s)", item.model_dir, err)
            items.remove(item)
    return []


def as_random_state(saved) -> tuple:
    """``random.Random.getstate()`` comes back from a checkpoint with lists for tuples."""
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)


def _describe(items: list[TrainingModel]) -> list[dict]:
    return [
        {
            "model_dir": str(i.model_dir),
            "architecture": i.architecture,
            "known_triggers": len(i.triggers),
            "examples": len(i.examples),
        }
        for i in items
    ]


def _draw_curves(folder: Path) -> None:
    """``training.png`` beside the losses, where the lab's plotting library is installed
    (the container has none: its run still writes both JSON files)."""
    from telelora.lab import curves

    try:
        log.info("training curves: %s", curves.plot(folder))
    except ImportError:
        log.info("no matplotlib (pip install '.[lab]'): %s/%s not drawn", folder, curves.PLOT_FILE)


def _gathered(world: World, mine: dict) -> dict:
    """Every rank's per-model dict merged into one."""
    return {name: value for part in world.gather(mine) for name, value in part.items()}


def _per_model_loss(monitor: dict, records: list[dict]) -> dict[str, dict]:
    """Per model: its monitor-batch loss under the identity (no adapter), at the start and
    at the end of training, and how many steps trained on it. Training helped a model when
    its end is below its identity."""
    steps: dict[str, int] = {}
    for r in records:
        for name, _ in r["models"]:
            steps[name] = steps.get(name, 0) + 1
    first, last = monitor["evaluations"][0]["losses"], monitor["evaluations"][-1]["losses"]
    return {
        name: {"identity": identity, "start": first.get(name), "end": last.get(name), "steps": steps.get(name, 0)}
        for name, identity in sorted(monitor["identity"].items())
    }


def _validation_summary(monitor: dict, best: dict) -> dict | None:
    """What the provenance says of validation: the models, the curve and the shipped step."""
    if not best:
        return None
    return {
        "models": sorted(monitor["unmitigated"]),
        "unmitigated": monitor["unmitigated"],
        "curve": [
            {"step": v["step"], "mean_strict_fidelity": v["mean_strict_fidelity"]} for v in monitor["validation"]
        ],
        "shipped_step": best["step"],
        "shipped_mean_strict_fidelity": best["mean"],
        "shipped_models": next(v["models"] for v in monitor["validation"] if v["step"] == best["step"]),
    }


def _log_summary(provenance: dict, out_dir) -> None:
    log.info(
        "meta-training done: %d iterations on %d models in %.0f s, loss %.4f -> %.4f; wrote %s",
        provenance["iterations"],
        len(provenance["trained_on"]),
        provenance["seconds"],
        provenance["first_loss"],
        provenance["final_loss_mean_last_10"],
        out_dir,
    )
    for name, stats in provenance["per_model_loss"].items():
        start, end = (math.nan if stats[k] is None else stats[k] for k in ("start", "end"))
        log.info(
            "  %-28s %5d steps  monitor loss: identity %.4f, start %.4f, end %.4f",
            name, stats["steps"], stats["identity"], start, end,
        )  # fmt: skip
    worse = [
        name
        for name, st in provenance["per_model_loss"].items()
        if st["end"] is None or (st["identity"] > NEEDS_CHANGE and st["end"] >= st["identity"])
    ]
    if worse:
        log.warning("training did not lower the loss of %d model(s) that need a change: %s", len(worse), worse)
