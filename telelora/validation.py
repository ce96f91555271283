"""Validation during meta-training: strict Fidelity of held-out models under the current generators.

``configure`` measures it at the start, at every checkpoint and at the end, and ships the
generators of the best checkpoint: the choice is made on validation models only (a farm's
validation split, never its test split). Kept cheap so it can run often:

* a fixed few prompts per model (``validation_prompts`` triggered and as many clean ones,
  the first of its ``test-example-data/prompts.json``);
* the mitigation as ``mitigate`` plans it (``generated_delta``: K steps at ``step_size``)
  but without the layer bound and the drift guard, safety nets that can only shrink a
  change and whose ranges come from the finished run;
* the unmitigated ASR measured once, on the same prompts, so removal compares like with like.

Strict Fidelity (DESIGN.md section 5): a poisoned model scores
``((pre_asr - asr) / pre_asr) * agreement``, a clean one its ``agreement`` (teacher-forced,
with the unmitigated model's stored answers).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from telelora import modelio
from telelora.adapters import LowRankDelta
from telelora.architectures import AdaptedLayer
from telelora.chat import agreement, hit_rate
from telelora.errors import TeleLoRAError
from telelora.generated import generated_delta
from telelora.generator import GeneratorBank
from telelora.metaparameters import Metaparameters

PROMPTS_FILE = Path("test-example-data") / "prompts.json"


def strict_fidelity(poisoned: bool, pre_asr: float, asr: float, agreement: float) -> float:
    """A poisoned model's removal times its agreement, a clean model's agreement; NaN when
    the removal is undefined (no measured ASR before mitigation)."""
    if not poisoned:
        return agreement
    removal = (pre_asr - asr) / pre_asr if pre_asr else math.nan
    return removal * agreement


@dataclasses.dataclass
class ValidationModel:
    """One held-out model's fixed prompts, and its ASR on them with no change."""

    model_dir: Path
    poisoned: bool
    triggered: list[str]
    targets: list[str]
    clean: list[str]
    references: list[list[int]]  # the unmitigated model's answer ids to ``clean``
    pre_asr: float | None = None

    @property
    def room(self) -> int:
        """Generation room for a whole clean answer before an appended target."""
        return max((len(r) for r in self.references), default=0)


def load_validation_model(model_dir: Path, prompts: int) -> ValidationModel:
    """A validation model's first ``prompts`` triggered and clean prompts; one clear error
    when its folder lacks the round's prompts file or ground truth."""
    try:
        data = json.loads((model_dir / PROMPTS_FILE).read_text())
        poisoned = modelio.read_poisoned(model_dir)
        triggered = data["triggered"][:prompts] if poisoned else []
        clean = data["clean"][:prompts]
        model = ValidationModel(
            model_dir,
            poisoned,
            [t["prompt"] for t in triggered],
            [t["target"] for t in triggered],
            [c["prompt"] for c in clean],
            [[int(i) for i in c["reference_answer_ids"]] for c in clean],
        )
    except (TeleLoRAError, OSError, ValueError, KeyError, TypeError) as err:
        raise TeleLoRAError(
            f"validation model {model_dir} lacks a readable {PROMPTS_FILE} with answer ids and a "
            f"ground_truth.csv ({type(err).__name__}: {err})"
        ) from err
    if not model.clean or (poisoned and not model.triggered):
        raise TeleLoRAError(f"validation model {model_dir}: {PROMPTS_FILE} has no prompts to validate on")
    return model


@torch.no_grad()
def measure(
    bank: GeneratorBank | None,
    item: ValidationModel,
    model,
    tokenizer,
    layers: list[AdaptedLayer],
    reference: list[str],
    meta: Metaparameters,
) -> dict[str, float]:
    """ASR, agreement and strict Fidelity of ``model`` under the generators' change (the
    unchanged model when ``bank`` is None; its ASR becomes ``item.pre_asr`` the first time)."""
    model.eval()
    delta = LowRankDelta() if bank is None else generated_delta(model, tokenizer, bank, layers, reference, meta)
    batch = meta.activation_batch_size
    with delta.applied(layers):
        asr = (
            hit_rate(model, tokenizer, item.triggered, sorted(set(item.targets)), batch, "validation ASR", item.room)
            if item.poisoned
            else math.nan
        )
        agree = agreement(model, tokenizer, item.clean, item.references, batch)
    if bank is None and item.pre_asr is None:
        item.pre_asr = asr
    strict = strict_fidelity(item.poisoned, item.pre_asr or math.nan, asr, agree)
    return {"asr": asr, "agreement": agree, "strict_fidelity": strict}


def mean_strict_fidelity(per_model: dict[str, dict[str, float]]) -> float:
    """The mean over models whose strict Fidelity is defined (NaN when none is)."""
    values = [m["strict_fidelity"] for m in per_model.values() if math.isfinite(m["strict_fidelity"])]
    return sum(values) / len(values) if values else math.nan
