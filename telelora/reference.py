"""The references a merge can take, found in what the round gives, and the merge's arithmetic.

A Trojan is a change of the weights that another fine-tune of the same base does not share.
Averaging the input with such a reference, ``W <- (1 - w) W + w W_ref`` for every weight,
scales by ``1 - w`` what the two do not share, the Trojan included, and keeps what they
share: the base and, for fine-tunes on like data, much of the fine-tune (a published
defence: Arora et al. 2024, "Here's a free lunch: sanitizing backdoored models with model
merge", which merges with other fine-tunes whether backdoored or not). With several
references ``W_ref`` is their weighted mean: what is peculiar to one of them is diluted.

Kinds, in the order ``reference_kinds`` gives (by default this one), up to ``reference_count``:

``clean``
    clean models of the training round (``--round_training_dataset_dirpath``;
    ``ground_truth.csv`` 0) of the input's ``model_architecture``;
``poisoned``
    poisoned models of the round of that architecture whose trigger the round declares
    (``round_config.json`` / ``reduced-config.json`` ``triggers``, else ``METADATA.csv``):
    the merge route checks on the merged model that their Trojans no longer fire
    (``telelora.merge``);
``base``
    a public base checkpoint shipped with the image: ``base_models_dirpath/<model_architecture>``.

Which weights are merged: every one, or (``merge_from_depth`` > 0) only those of the transformer
blocks from that relative depth on (:func:`merged_tensors`).

Each must hold exactly the input's floating-point tensors (names and shapes) and never be the
input itself; within a kind, round models are taken in folder-name order (reproducible).
Anything unreadable is one loud line and the next candidate. No reference at all: the
generators (``telelora.route``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from telelora import modelio
from telelora.alignment import Trigger, declared_triggers
from telelora.errors import TeleLoRAError

log = logging.getLogger(__name__)
KINDS = ("clean", "poisoned", "base")
ROUND_FLAG = "--round_training_dataset_dirpath"
# METADATA.csv columns that may hold a model's trigger text and its response, most specific first
TRIGGER_COLUMNS = ("trigger_text", "trigger.text", "trigger")
RESPONSE_COLUMNS = ("trigger_response", "trigger.response", "target_text", "target", "response")
BLOCK_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # a transformer block's tensors, in every supported family


@dataclasses.dataclass(frozen=True)
class Reference:
    """One model to merge toward: where it is, which kind it is and (poisoned) its triggers."""

    path: Path
    kind: str
    triggers: tuple[Trigger, ...] = ()


HeldReferences = dict[Path, dict[str, torch.Tensor]]  # {reference folder: {checkpoint name: tensor as stored}}


def interpolate(weight: torch.Tensor, reference: torch.Tensor, reference_weight: float) -> torch.Tensor:
    """``(1 - w) W + w W_ref`` in float32 (the caller rounds it to the stored dtype)."""
    return torch.lerp(weight.float(), reference.float().to(weight.device), reference_weight)


def floating_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """``{checkpoint name: shape}`` of the folder's floating-point tensors, from the headers alone."""
    return {
        k: shape
        for k, (dtype, shape) in modelio.tensor_headers(model_dir).items()
        if dtype in modelio.SAFETENSORS_FLOATS
    }


def labelled(model_dir: Path, poisoned: bool) -> bool:
    """Whether ``ground_truth.csv`` says exactly this label (1 poisoned, 0 clean): an unlabelled
    or unreadable model is never a reference of either kind."""
    try:
        return modelio.read_poisoned(model_dir) == poisoned
    except TeleLoRAError:
        return False


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def metadata_triggers(round_dir: Path, model_name: str) -> list[Trigger]:
    """The trigger a round's ``METADATA.csv`` records for ``model_name`` (its row's trigger text
    and response columns, as NIST's rounds and the farm write them); empty when there is no
    such row or it names no trigger with a response. A missing or unreadable file is an error."""
    path = (round_dir.parent if round_dir.name == "models" else round_dir) / "METADATA.csv"
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise TeleLoRAError(f"{path} cannot be read ({err})") from err
    row = next((r for r in rows if (r.get("model_name") or "").strip() == model_name), None)
    if row is None:
        return []
    columns = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}

    def first(names: tuple[str, ...]) -> str:
        return next((columns[n] for n in names if columns.get(n) and columns[n].lower() not in ("none", "nan")), "")

    text, target = first(TRIGGER_COLUMNS), first(RESPONSE_COLUMNS)
    placement = columns.get("placement") or "middle"
    return [Trigger(text, target, placement)] if text and target else []


def reference_triggers(model_dir: Path, round_dir: Path) -> tuple[Trigger, ...]:
    """A poisoned training model's declared triggers, each with the response it sets off (the
    merge route checks that response): its ``round_config.json`` / ``reduced-config.json``
    first, else the round's ``METADATA.csv``. None readable is an error naming both places."""
    found = [t for t in declared_triggers(model_dir) if t.target]
    if not found:
        found = metadata_triggers(round_dir, model_dir.name)
    if not found:
        raise TeleLoRAError(
            f"{model_dir} is poisoned but neither its round_config.json / reduced-config.json nor the round's "
            "METADATA.csv declares a trigger with its response"
        )
    return tuple(found)


def _compatible(candidate: Path, architecture: str, shapes: dict) -> bool:
    """Whether ``candidate`` can be merged with the input: same base, same floating tensors."""
    if modelio.round_config(candidate).get("model_architecture") != architecture:
        return False
    try:
        theirs = floating_shapes(candidate)
    except Exception as err:  # an unreadable reference is skipped, never fatal
        log.warning("reference candidate %s is unreadable (%s); skipped", candidate, err)
        return False
    differing = sorted(k for k in shapes.keys() | theirs.keys() if shapes.get(k) != theirs.get(k))
    if differing:
        log.warning("reference candidate %s differs in %d tensors (e.g. %s); skipped", candidate, len(differing),
                    differing[0])  # fmt: skip
        return False
    return True


def _round_candidates(round_dir: Path | None, model_dir: Path, kind: str) -> Iterator[Reference]:
    if round_dir is None:
        return
    try:
        folders = modelio.round_model_dirs(round_dir, ROUND_FLAG)
    except Exception as err:  # a round the harness passes that cannot be read must not cost the output
        log.error("NO REFERENCE MODEL FROM THE ROUND: %s cannot be listed (%s)", round_dir, err)
        return
    for folder in folders:
        if _same_folder(folder, model_dir):
            continue
        if kind == "clean" and labelled(folder, poisoned=False):
            yield Reference(folder, "clean")
        elif kind == "poisoned" and labelled(folder, poisoned=True):
            try:
                yield Reference(folder, "poisoned", reference_triggers(folder, round_dir))
            except TeleLoRAError as err:
                log.error("POISONED REFERENCE SKIPPED: %s: its trigger cannot be read (%s)", folder.name, err)


def base_checkpoint(base_models_dir: Path | None, architecture: str) -> Path | None:
    """``base_models_dir/<model_architecture>`` when it holds a model folder, else None (logged)."""
    if base_models_dir is None:
        return None
    folder = base_models_dir / architecture
    try:
        modelio.check_model_dir(folder)
    except TeleLoRAError as err:
        log.error("NO BASE CHECKPOINT for %s: %s", architecture, err)
        return None
    return folder


def find_references(
    round_dir: Path | None,
    model_dir: Path,
    limit: int,
    kinds: tuple[str, ...] = ("clean",),
    base_models_dir: Path | None = None,
) -> list[Reference]:
    """Up to ``limit`` references for ``model_dir``, kind by kind in the order of ``kinds``
    (see the module's docstring); none, with the reasons logged, where there is none."""
    if limit < 1:
        raise ValueError(f"reference_count must be at least 1, not {limit}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown reference kinds {unknown}; use {list(KINDS)}")
    architecture = modelio.round_config(model_dir).get("model_architecture")
    if not architecture:
        log.warning("%s names no model_architecture in round_config.json: no reference model is used", model_dir)
        return []
    shapes = floating_shapes(model_dir)
    found: list[Reference] = []
    for kind in kinds:
        if kind == "base":
            folder = base_checkpoint(base_models_dir, architecture)
            candidates = [Reference(folder, "base")] if folder is not None else []
        else:
            candidates = _round_candidates(round_dir, model_dir, kind)
        for candidate in candidates:
            if len(found) == limit:
                break
            if _compatible(candidate.path, architecture, shapes):
                found.append(candidate)
    if found and len(found) < limit:
        log.info("%d reference(s) for %s, fewer than reference_count %d: merging toward those",
                 len(found), architecture, limit)  # fmt: skip
    if not found:
        log.warning("no reference of kinds %s for %s: no reference model is used", list(kinds), architecture)
    return found


def _open_tensors(stack: contextlib.ExitStack, model_dir: Path) -> dict[str, object]:
    """``{tensor name: the open safetensors file holding it}`` of a checkpoint, closed with ``stack``."""
    handles = {}
    for file in modelio.weight_files(model_dir):
        handle = stack.enter_context(safe_open(str(file), framework="pt"))
        handles.update(dict.fromkeys(handle.keys(), handle))
    return handles


@contextlib.contextmanager
def open_references(
    reference_dirs: list[Path], weights: list[float] | None = None, held: HeldReferences | None = None
) -> Iterator[Callable[[str], torch.Tensor]]:
    """A function ``tensor(name)``: the mean, in float32, of that tensor over the references,
    weighted by ``weights`` (default: equal), read one tensor at a time from disk, so merging a
    large model holds one shard of the input and one tensor per reference. A tensor that
    ``held`` keeps for a reference (:func:`merge_trial` read it already, in its stored dtype)
    is taken from there: the same float32 values, without reading the checkpoint again."""
    held = {} if held is None else held
    if not reference_dirs:
        raise ValueError("open_references needs at least one reference model")
    weights = [1.0] * len(reference_dirs) if weights is None else list(weights)
    if len(weights) != len(reference_dirs) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"open_references needs one non-negative weight per reference, not all 0: {weights}")
    kept = [(d, w / sum(weights)) for d, w in zip(reference_dirs, weights, strict=True) if w > 0]
    with contextlib.ExitStack() as stack:
        where = [_open_tensors(stack, reference_dir) for reference_dir, _ in kept]

        def tensor(name: str) -> torch.Tensor:
            # out of place: a float32 tensor from get_tensor may be a view of the file's
            # private memory map, which an in-place sum would write into (and keep in RAM)
            total = None
            for (reference_dir, share), handles in zip(kept, where, strict=True):
                if name in held.get(reference_dir, {}):
                    value = held[reference_dir][name].to("cpu").float()
                elif name not in handles:
                    raise TeleLoRAError(f"reference model {reference_dir} holds no tensor {name}")
                else:
                    value = handles[name].get_tensor(name).float()
                value = value if share == 1 else value * share
                total = value if total is None else total + value
            return total

        yield tensor


def block_depths(names: Iterable[str]) -> dict[str, float]:
    """``{name: relative depth}`` of the transformer blocks' tensors among ``names``: block
    ``index / (blocks - 1)``, 0 for the first and 1 for the last (1 when there is one)."""
    index = {name: int(match.group(1)) for name in names if (match := BLOCK_NAME.search(name))}
    last = max(index.values(), default=0)
    return {name: i / last if last else 1.0 for name, i in index.items()}


def merged_tensors(names: Iterable[str], from_depth: float) -> set[str]:
    """The checkpoint tensors a merge changes: all of ``names`` at ``from_depth`` 0; else those
    of the transformer blocks at relative depth ``>= from_depth`` (:func:`block_depths`), the
    embeddings, final norm and head staying the input's.

    Why it exists: between two full fine-tunes the embeddings' merge removed no Trojan and cost
    agreement, and the blocks from depth 0.25 on scored better than every weight on that
    validation split; 0 ships because on the LoRA validation split a Trojan survived the
    partial merge (docs/benches.md, ``bench/merge_parts.py``). Names with no block index (an
    unknown layout): one loud line, and every tensor is merged."""
    names = list(names)
    if from_depth <= 0:
        return set(names)
    depths = block_depths(names)
    if not depths:
        log.warning("MERGE DEPTH: no transformer block (layers.N.) among the tensor names; every weight is merged")
        return set(names)
    return {name for name, depth in depths.items() if depth >= from_depth}


def merge_changes(
    model_dir: Path, tensor: Callable[[str], torch.Tensor], reference_weight: float, from_depth: float = 0.0
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """For ``modelio.save_mitigated``: the floating-point tensors of ``model_dir``'s checkpoint
    that :func:`merged_tensors` picks, merged toward the reference whose tensors ``tensor``
    (:func:`open_references`) reads; the others are copied as they are."""
    names = merged_tensors(floating_shapes(model_dir), from_depth)
    return {name: functools.partial(_merged, tensor, name, reference_weight) for name in sorted(names)}


def _merged(tensor, name: str, reference_weight: float, stored: torch.Tensor) -> torch.Tensor:
    return interpolate(stored, tensor(name), reference_weight)


@torch.no_grad()
def merge_into(
    model: torch.nn.Module,
    model_dir: Path,
    reference_dirs: list[Path],
    reference_weight: float,
    shares: list[float] | None = None,
    from_depth: float = 0.0,
) -> int:
    """Interpolate a loaded ``model`` (read from ``model_dir``) toward the references' mean
    (weighted by ``shares``, default equal) in place, the parameters :func:`merged_tensors`
    picks; return how many were merged. The ``mitigate`` job writes the same merge into a
    copy of the checkpoint instead (:func:`merge_changes`)."""
    params = _merged_params(model, model_dir, from_depth)
    with open_references(reference_dirs, shares) as tensor:
        for name, param in params.items():
            param.copy_(interpolate(param, tensor(name), reference_weight).to(param.dtype))
    return len(params)


def _merged_params(model: torch.nn.Module, model_dir: Path, from_depth: float) -> dict[str, torch.nn.Parameter]:
    """The model's parameters :func:`merged_tensors` picks, by checkpoint name."""
    params = dict(model.named_parameters())
    names = modelio.checkpoint_names(model_dir, {n: tuple(p.shape) for n, p in params.items()})
    picked = merged_tensors(names.values(), from_depth)
    return {names[n]: p for n, p in params.items() if names[n] in picked}


def restore(model: torch.nn.Module, model_dir: Path) -> None:
    """Put back every parameter of ``model`` as ``model_dir``'s checkpoint stores it: the merge
    entirely toward the input itself (exact: ``lerp`` at weight 1 returns its end)."""
    merge_into(model, model_dir, [model_dir], 1.0)


@contextlib.contextmanager
def merged_in(
    model, model_dir: Path, reference_dirs: list[Path], weights: list[float], from_depth: float = 0.0
) -> Iterator[None]:
    """``model`` computing as the merge with per-reference ``weights`` (``W <- (1 - sum w_i) W
    + sum w_i W_i``), back to the input's own weights on exit, so the merge route can try a
    merge before writing it. No weight: the model as it is."""
    if sum(weights) <= 0:
        yield
        return
    merge_into(model, model_dir, reference_dirs, sum(weights), weights, from_depth)
    try:
        yield
    finally:
        restore(model, model_dir)


TRIAL_MEMORY_SHARE = 0.5  # the in-memory trial may take at most this share of the free RAM
TRIAL_GPU_HEADROOM = 4 * 2**30  # bytes left free on the accelerator for the checks' own generation


def available_memory() -> int:
    """Bytes of RAM free for new allocations (``MemAvailable``; else free pages; else 0)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return 0


def trial_store(device: torch.device, bytes_held: int) -> torch.device | None:
    """Where the in-memory trial keeps its copies: on the model's accelerator when they fit
    there beside ``TRIAL_GPU_HEADROOM`` (no transfer per try), else in RAM when under
    ``TRIAL_MEMORY_SHARE`` of the free RAM, else None (each try reads from disk)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if bytes_held + TRIAL_GPU_HEADROOM <= free:
            return device
    if bytes_held <= TRIAL_MEMORY_SHARE * available_memory():
        return torch.device("cpu")
    return None


@dataclasses.dataclass
class MergeTrial:
    """How the merge route's checks tried merges: each reference read once and every try
    computed from the copies ``held_on`` a device, or (``"disk"``: not enough memory) each try
    re-reading the checkpoints."""

    held_on: str = "disk"
    bytes_held: int = 0
    tries: int = 0

    @property
    def in_memory(self) -> bool:
        return self.held_on != "disk"


def _read_stored(reference_dir: Path, names: list[str], store: torch.device) -> dict[str, torch.Tensor]:
    """``names`` of a reference's checkpoint, each in its stored dtype on ``store`` (a copy, never a
    view of the file's memory map); a name the reference lacks is one clear error."""
    with contextlib.ExitStack() as stack:
        handles = _open_tensors(stack, reference_dir)
        missing = [n for n in names if n not in handles]
        if missing:
            raise TeleLoRAError(f"reference model {reference_dir} holds no tensor {missing[0]}")
        return {n: handles[n].get_tensor(n).to(store, copy=True) for n in names}


@contextlib.contextmanager
def merge_trial(
    model: torch.nn.Module,
    model_dir: Path,
    reference_dirs: list[Path],
    record: MergeTrial | None = None,
    from_depth: float = 0.0,
    keep: HeldReferences | None = None,
) -> Iterator[Callable[[list[float]], contextlib.AbstractContextManager]]:
    """A function ``merged(weights)``: a context in which ``model`` computes as the merge with
    per-reference ``weights``, back to its own weights on exit (as :func:`merged_in`).

    The checks try up to ten merges; re-reading the input and every reference from disk for
    each costs about twenty passes over the checkpoints, too slow for an 8B model in NIST's
    600 s. So each reference is read once into memory as it is stored, ``W_i``, beside a copy
    of ``W``, and each try sets ``W + sum_i w_i (W_i - W)`` (computed in float32 on the model's
    device) and puts ``W`` back exactly. That holds ``1 + n`` copies of the merged weights
    (:func:`merged_tensors`), on the accelerator when they fit there, else in RAM
    (:func:`trial_store`); when neither has room, one loud line and each try reads from disk.
    ``keep`` (a dict) receives the references as read, so the write takes them from memory
    (:func:`open_references`) instead of reading every reference a second time: the merge
    route then reads each checkpoint once, and the input once more to copy it."""
    record = MergeTrial() if record is None else record
    params = _merged_params(model, model_dir, from_depth)
    stored = [modelio.tensor_headers(d) for d in reference_dirs]
    record.bytes_held = sum(p.numel() * p.element_size() for p in params.values()) + sum(
        p.numel() * modelio.SAFETENSORS_FLOATS[headers[n][0]].itemsize
        for headers in stored
        for n, p in params.items()
        if n in headers and headers[n][0] in modelio.SAFETENSORS_FLOATS
    )
    store = trial_store(next(iter(params.values())).device, record.bytes_held)
    record.held_on = str(store or "disk")

    if store is None:
        log.warning("MERGE CHECKS FROM DISK: holding the merge in memory needs %.1f GB, more than the accelerator "
                    "has free and %.0f%% of the free RAM; each try re-reads the checkpoints (slower)",
                    record.bytes_held / 1e9, 100 * TRIAL_MEMORY_SHARE)  # fmt: skip

        def from_disk(weights: list[float]) -> contextlib.AbstractContextManager:
            record.tries += 1
            return merged_in(model, model_dir, reference_dirs, weights, from_depth)

        yield from_disk
        return
    with torch.no_grad():
        own = {n: p.detach().to(store, copy=True) for n, p in params.items()}
        references = [_read_stored(d, list(params), store) for d in reference_dirs]
    if keep is not None:
        keep.update(zip(reference_dirs, references, strict=True))

    @contextlib.contextmanager
    def merged(weights: list[float]) -> Iterator[None]:
        record.tries += 1
        if sum(weights) <= 0:
            yield
            return
        with torch.no_grad():
            for name, param in params.items():
                input_weight = own[name].to(param.device, torch.float32)
                value = input_weight.clone()
                for weight, held in zip(weights, references, strict=True):
                    if weight:
                        value.add_(held[name].to(param.device, torch.float32) - input_weight, alpha=weight)
                param.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(own[name])

    yield merged
