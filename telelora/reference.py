"""Merge toward clean models of the same base, when the round's training models are at hand.

A Trojan is a change of the weights that a clean fine-tune of the same base does not share.
Averaging the input with such a reference, ``W <- (1 - w) W + w W_ref`` for every weight,
scales by ``1 - w`` what the two do not share, the Trojan included, and keeps what they
share: the base and, for fine-tunes on like data, most of the fine-tune (a published
defence: Arora et al. 2024, "Here's a free lunch: sanitizing backdoored models with model
merge"). With several clean models ``W_ref`` is their mean: what they share stays, what is
peculiar to one of them is diluted, so the merge moves the input less away from the base and
the common fine-tune. The generators, by contrast, must find the Trojan's direction from
activations alone, which they do not do reliably (README, issue 11).

NIST's harness may pass ``--round_training_dataset_dirpath``: the training round's models,
ground truth included (DESIGN.md section 2). The references are the first ``reference_count``
clean ones of them (``ground_truth.csv`` 0; sorted by folder name, so the choice is
reproducible) whose ``round_config.json`` names the input's ``model_architecture`` and whose
checkpoint holds the same floating-point tensors (names and shapes) as the input's. Without
one, ``mitigate`` falls back to the data-free generators.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from telelora import modelio
from telelora.errors import TeleLoRAError

log = logging.getLogger(__name__)


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


def is_clean(model_dir: Path) -> bool:
    """True only when ``ground_truth.csv`` says 0: an unlabelled model is never a reference."""
    try:
        return not modelio.read_poisoned(model_dir)
    except TeleLoRAError:
        return False


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def find_references(round_dir: Path, model_dir: Path, limit: int) -> list[Path]:
    """The first ``limit`` clean models of ``round_dir`` that can be merged with ``model_dir``
    (see the module's docstring); none, with the reason logged, where there is none."""
    if limit < 1:
        raise ValueError(f"reference_count must be at least 1, not {limit}")
    architecture = modelio.round_config(model_dir).get("model_architecture")
    if not architecture:
        log.warning("%s names no model_architecture in round_config.json: no reference model is used", model_dir)
        return []
    shapes = floating_shapes(model_dir)
    candidates = [
        d
        for d in modelio.round_model_dirs(round_dir, "--round_training_dataset_dirpath")
        if is_clean(d) and not _same_folder(d, model_dir)
    ]
    found = []
    for candidate in candidates:
        if modelio.round_config(candidate).get("model_architecture") != architecture:
            continue
        try:
            theirs = floating_shapes(candidate)
        except Exception as err:  # an unreadable training model is skipped, never fatal
            log.warning("reference candidate %s is unreadable (%s); skipped", candidate, err)
            continue
        differing = sorted(k for k in shapes.keys() | theirs.keys() if shapes.get(k) != theirs.get(k))
        if differing:
            log.warning("reference candidate %s differs in %d tensors (e.g. %s); skipped", candidate,
                        len(differing), differing[0])  # fmt: skip
            continue
        found.append(candidate)
        if len(found) == limit:
            break
    if found and len(found) < limit:
        log.info("%d clean %s in %s, fewer than reference_count %d: merging toward the mean of those",
                 len(found), architecture, round_dir, limit)  # fmt: skip
    if not found:
        log.warning(
            "no clean %s among the %d clean models of %s: no reference model is used",
            architecture,
            len(candidates),
            round_dir,
        )
    return found


@contextlib.contextmanager
def open_references(reference_dirs: list[Path]) -> Iterator[Callable[[str], torch.Tensor]]:
    """A function ``tensor(name)``: the mean, in float32, of that tensor over the references,
    read one tensor at a time from disk, so merging a large model holds one shard of the input
    and one tensor per reference."""
    if not reference_dirs:
        raise ValueError("open_references needs at least one reference model")
    with contextlib.ExitStack() as stack:
        where: list[dict] = []
        for reference_dir in reference_dirs:
            handles = {}
            for file in modelio.weight_files(reference_dir):
                handle = stack.enter_context(safe_open(str(file), framework="pt"))
                handles.update(dict.fromkeys(handle.keys(), handle))
            where.append(handles)

        def tensor(name: str) -> torch.Tensor:
            # out of place: a float32 tensor from get_tensor may be a view of the file's
            # private memory map, which an in-place sum would write into (and keep in RAM)
            total = None
            for reference_dir, handles in zip(reference_dirs, where, strict=True):
                if name not in handles:
                    raise TeleLoRAError(f"reference model {reference_dir} holds no tensor {name}")
                value = handles[name].get_tensor(name).float()
                total = value if total is None else total + value
            return total / len(reference_dirs) if len(reference_dirs) > 1 else total

        yield tensor


def merge_changes(
    model_dir: Path, tensor: Callable[[str], torch.Tensor], reference_weight: float
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """For ``modelio.save_mitigated``: every floating-point tensor of ``model_dir``'s checkpoint
    merged toward the reference whose tensors ``tensor`` (:func:`open_references`) reads."""
    return {name: functools.partial(_merged, tensor, name, reference_weight) for name in floating_shapes(model_dir)}


def _merged(tensor, name: str, reference_weight: float, stored: torch.Tensor) -> torch.Tensor:
    return interpolate(stored, tensor(name), reference_weight)


@torch.no_grad()
def merge_into(model: torch.nn.Module, model_dir: Path, reference_dirs: list[Path], reference_weight: float) -> int:
    """Interpolate a loaded ``model`` (read from ``model_dir``) toward the references' mean in
    place, every floating-point parameter; return how many were merged. For benches: the
    ``mitigate`` job writes the same merge into a copy of the checkpoint instead."""
    params = dict(model.named_parameters())
    names = modelio.checkpoint_names(model_dir, {n: tuple(p.shape) for n, p in params.items()})
    with open_references(reference_dirs) as tensor:
        for name, param in params.items():
            param.copy_(interpolate(param, tensor(names[name]), reference_weight).to(param.dtype))
    return len(params)
