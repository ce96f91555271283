"""Merge toward a clean model of the same base, when the round's training models are at hand.

A Trojan is a change of the weights that a clean fine-tune of the same base does not share.
Averaging the input with such a reference, ``W <- (1 - w) W + w W_ref`` for every weight,
scales by ``1 - w`` what the two do not share, the Trojan included, and keeps what they
share: the base and, for fine-tunes on like data, most of the fine-tune (a published
defence: Arora et al. 2024, "Here's a free lunch: sanitizing backdoored models with model
merge"). The generators, by contrast, must find the Trojan's direction from activations
alone, which they do not do reliably (README, issue 11).

NIST's harness may pass ``--round_training_dataset_dirpath``: the training round's models,
ground truth included (DESIGN.md section 2). The reference is the first clean one of them
(``ground_truth.csv`` 0; sorted by folder name, so the choice is reproducible) whose
``round_config.json`` names the input's ``model_architecture`` and whose checkpoint holds
the same floating-point tensors (names and shapes) as the input's. Without one,
``mitigate`` falls back to the data-free generators.
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
        return (model_dir / "ground_truth.csv").read_text().strip() == "0"
    except OSError:
        return False


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def find_reference(round_dir: Path, model_dir: Path) -> Path | None:
    """The first clean model of ``round_dir`` that can be merged with ``model_dir`` (see the
    module's docstring), or None, with the reason logged."""
    architecture = modelio.round_config(model_dir).get("model_architecture")
    if not architecture:
        log.warning("%s names no model_architecture in round_config.json: no reference model is used", model_dir)
        return None
    shapes = floating_shapes(model_dir)
    candidates = [
        d
        for d in modelio.round_model_dirs(round_dir, "--round_training_dataset_dirpath")
        if is_clean(d) and not _same_folder(d, model_dir)
    ]
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
        return candidate
    log.warning(
        "no clean %s among the %d clean models of %s: no reference model is used",
        architecture,
        len(candidates),
        round_dir,
    )
    return None


@contextlib.contextmanager
def open_reference(reference_dir: Path) -> Iterator[Callable[[str], torch.Tensor]]:
    """A function ``tensor(name)`` reading the reference's tensors one at a time from disk,
    so merging a large model holds one shard of the input and one tensor of the reference."""
    with contextlib.ExitStack() as stack:
        where = {}
        for file in modelio.weight_files(reference_dir):
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            where.update(dict.fromkeys(handle.keys(), handle))

        def tensor(name: str) -> torch.Tensor:
            if name not in where:
                raise TeleLoRAError(f"reference model {reference_dir} holds no tensor {name}")
            return where[name].get_tensor(name)

        yield tensor


def merge_changes(
    model_dir: Path, tensor: Callable[[str], torch.Tensor], reference_weight: float
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """For ``modelio.save_mitigated``: every floating-point tensor of ``model_dir``'s checkpoint
    merged toward the reference whose tensors ``tensor`` (:func:`open_reference`) reads."""
    return {name: functools.partial(_merged, tensor, name, reference_weight) for name in floating_shapes(model_dir)}


def _merged(tensor, name: str, reference_weight: float, stored: torch.Tensor) -> torch.Tensor:
    return interpolate(stored, tensor(name), reference_weight)


@torch.no_grad()
def merge_into(model: torch.nn.Module, model_dir: Path, reference_dir: Path, reference_weight: float) -> int:
    """Interpolate a loaded ``model`` (read from ``model_dir``) toward the reference in place,
    every floating-point parameter; return how many were merged. For benches: the ``mitigate``
    job writes the same merge into a copy of the checkpoint instead."""
    params = dict(model.named_parameters())
    names = modelio.checkpoint_names(model_dir, {n: tuple(p.shape) for n, p in params.items()})
    with open_reference(reference_dir) as tensor:
        for name, param in params.items():
            param.copy_(interpolate(param, tensor(names[name]), reference_weight).to(param.dtype))
    return len(params)
