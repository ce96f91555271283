"""The ``mitigate`` job: NIST's command around the two routes.

``telelora.route.choose_route`` decides from what the round gives: a merge toward references
(``telelora.merge``) or the data-free generators (``telelora.generated``). ``run`` checks its
inputs before loading anything, and once they pass it *always* leaves a loadable model +
tokenizer behind, the unchanged one (with a loud log line) if anything fails; its report
(``telelora_report.json`` in the output) says which route ran, with which references, and
what the checks did.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from telelora import generated, merge, modelio
from telelora.adapters import export_peft
from telelora.errors import TeleLoRAError
from telelora.io_utils import atomic_write_text
from telelora.learned import load_bank
from telelora.metaparameters import Metaparameters
from telelora.route import GENERATORS, MERGE, choose_route
from telelora.texts import load as load_texts

log = logging.getLogger(__name__)
REPORT_FILE = "telelora_report.json"


@dataclasses.dataclass
class MitigationReport:
    """``telelora_report.json``: what happened, so a reader of the output folder knows."""

    mitigated: bool
    reason: str
    model_architecture: str | None
    method: str = GENERATORS  # the route that wrote the output: "generators" or "reference_merge"
    route_reason: str = ""  # why that route
    reference_models: list[str] = dataclasses.field(default_factory=list)
    reference_kinds: list[str] = dataclasses.field(default_factory=list)
    reference_weights: list[float] = dataclasses.field(default_factory=list)  # per reference, after the checks
    reference_weight: float | None = None  # their sum: W <- (1 - w) W + w W_ref
    merge_from_depth: float | None = None  # the blocks merged: from this relative depth on (0: every weight)
    trigger_checks: list[dict] = dataclasses.field(default_factory=list)
    merge_drift_guard: dict | None = None
    merge_trial: dict | None = None  # how the checks tried merges: in RAM (one read per reference) or from disk
    merge_repair: dict | None = None  # the repair after the merge (telelora.repair): examples, steps, losses
    num_layers_adapted: int = 0
    device: str | None = None
    compute_dtype: str | None = None
    layer_bound: dict | None = None
    drift_guard: dict | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def _rewrite_report(output_dir: Path, report: MitigationReport) -> None:
    """The report again, now that its ``seconds`` include the save: the model is already in
    place, so a failure here costs the timing, never the output."""
    try:
        atomic_write_text(output_dir / REPORT_FILE, report.to_json())
    except OSError as err:
        log.warning("could not add the save's seconds to %s (%s)", REPORT_FILE, err)


def _merge_route(model_dir: Path, output_dir: Path, route, meta, learned_dir, load, report, exclude, lap) -> str:
    """Run the merge route into ``output_dir``: "written"; or, with one loud line, "dropped"
    (the checks left no reference) or "failed": the caller then runs the generators (the
    output still holds the input's copy: every write is staged)."""
    try:
        texts = load_texts(learned_dir) if merge.needs_model(list(route.references), meta) else None
        plan = merge.plan_merge(model_dir, list(route.references), meta, texts, load)
        report.reference_weights = [round(w, 6) for w in plan.weights]
        report.reference_weight = round(sum(plan.weights), 6)
        report.merge_from_depth = plan.from_depth
        report.trigger_checks = [dataclasses.asdict(c) for c in plan.trigger_checks]
        report.merge_drift_guard = dataclasses.asdict(plan.drift_guard)
        report.merge_trial = dataclasses.asdict(plan.trial)
        report.merge_repair = plan.repair.report() if plan.repair is not None else None
        lap("merge_checks")
        if not plan.merges:
            log.error("MERGE DROPPED: the checks left no reference with a weight; running the generators instead")
            report.method, report.route_reason = GENERATORS, f"{route.reason}; the checks dropped every reference"
            return "dropped"
        report.mitigated, report.reason = True, "mitigated"
        merge.save_merge(model_dir, output_dir, plan, {REPORT_FILE: report.to_json()}, exclude)
    except Exception as err:
        log.error("MERGE FAILED (%s: %s); running the generators instead", type(err).__name__, err)
        report.mitigated, report.reason = False, UNFINISHED
        report.method, report.route_reason = GENERATORS, f"{route.reason}; the merge failed: {err}"
        return "failed"
    lap("merge_and_save")
    _rewrite_report(output_dir, report)
    log.info("wrote %s (merged toward %s with weights %s; seconds %s)", output_dir, report.reference_models,
             report.reference_weights, report.seconds)  # fmt: skip
    return "written"


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
    route = choose_route(model_dir, None if round_training_dir is None else Path(round_training_dir), meta)
    log.info("route: %s (%s)", route.name, route.reason)
    if route.name == MERGE and peft_dir is not None:
        raise TeleLoRAError(
            f"--peft_dirpath exports a low-rank change, but the merge toward "
            f"{', '.join(str(r.path) for r in route.references)} changes every weight in full: drop --peft_dirpath, "
            "or --round_training_dataset_dirpath, or set reference_weight 0"
        )

    report = MitigationReport(mitigated=False, reason=UNFINISHED, model_architecture=architecture, seconds=seconds,
                              method=route.name, route_reason=route.reason)  # fmt: skip
    report.reference_models = [str(r.path) for r in route.references]
    report.reference_kinds = [r.kind for r in route.references]
    try:
        modelio.copy_model_files(model_dir, output_dir, {REPORT_FILE: report.to_json()}, exclude=exclude)
    except OSError as err:
        raise TeleLoRAError(f"the output folder {output_dir} cannot be written ({err})") from err
    lap("copy_input")

    loaded: dict = {}

    def load():
        """The input model, loaded once, when a route first needs it."""
        if "model" not in loaded:
            device, dtype = modelio.pick_device_dtype(meta.device, meta.dtype, model_dir)
            report.device, report.compute_dtype = str(device), str(dtype).removeprefix("torch.")
            loaded["model"] = modelio.load_model(model_dir, device, dtype, trust_remote_code)
            log.info("loaded %s (%s) on %s in %s", model_dir, architecture or type(loaded["model"]).__name__, device,
                     dtype)  # fmt: skip
            lap("load")
        return loaded["model"], tokenizer

    mitigation = None
    try:
        if route.name == MERGE:
            outcome = _merge_route(model_dir, output_dir, route, meta, learned_dir, load, report, exclude, lap)
            if outcome == "written":
                return report
            if outcome == "failed":
                loaded.clear()  # a failed check may have left the model merged: start again from the input
        model, _ = load()
        torch.manual_seed(meta.seed)
        bank, info = load_bank(learned_dir, meta)
        bank.to(next(model.parameters()).device)
        texts = load_texts(learned_dir)
        mitigation = generated.plan_mitigation(model, tokenizer, bank, texts, meta, info.get("layer_ranges"))
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
