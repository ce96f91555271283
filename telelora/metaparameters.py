"""The one place where configuration is defined: ``metaparameters_schema.json`` plus this
typed view of it. Files are validated once, at load time, and everything downstream
takes a :class:`Metaparameters`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jsonschema

from telelora.errors import MetaparameterError

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECTION_TYPES = ("q", "k", "v", "o", "gate", "up", "down")
# read by configure alone: a mitigated model does not depend on them (benches compare the rest)
TRAINING_ONLY = frozenset(
    {
        "learning_rate", "train_iterations", "train_batch_size", "alignment_examples_per_model",
        "jailbreak_rate", "clean_prompt_share", "answer_tokens", "validation_prompts",
    }
)  # fmt: skip
# read by mitigate alone, never by the generators: configure may resume across a change of them
MITIGATE_ONLY = frozenset(
    {
        "reference_weight", "reference_count", "reference_kinds", "base_models_dirpath", "trigger_check_prompts",
        "trigger_check_answer_tokens",
        "trigger_check_max_asr", "merge_min_agreement", "merge_from_depth", "guard_min_agreement", "guard_prompts",
        "guard_answer_tokens", "guard_layer_factor", "repair_prompts", "repair_max_agreement", "repair_learning_rate",
        "repair_batch_size",
    }
)  # fmt: skip

# keys added after results were recorded, with the value that does what ran before they existed
# (benches compare an older run's metaparameters as if it had held these)
ADDED_LATER = {"merge_from_depth": 0.0, "repair_prompts": 0, "repair_max_agreement": 1.0}
# keys that do nothing while another key is at its off value: (key, off value) -> inert keys
INERT_WHEN_OFF = {("repair_prompts", 0): ("repair_max_agreement", "repair_learning_rate", "repair_batch_size")}


def meta_training_knobs(meta: Metaparameters) -> dict:
    """What a meta-training checkpoint must match to be resumed: every knob but the ones only
    ``mitigate`` reads and the step count (a run may be resumed to train longer)."""
    return {k: v for k, v in meta.to_dict().items() if k != "train_iterations" and k not in MITIGATE_ONLY}


def effective(values: dict) -> dict:
    """``values`` without the keys that do nothing given the others (the repair's learning rate
    while the repair is off), so two runs that compute the same compare equal."""
    inert = {k for (key, off), keys in INERT_WHEN_OFF.items() if values.get(key, off) == off for k in keys}
    return {k: v for k, v in values.items() if k not in inert}


@dataclasses.dataclass(frozen=True)
class Metaparameters:
    """Every knob of generation, mitigation and meta-training (see the schema's descriptions)."""

    generator_stacks: int
    generator_hidden: int
    rank: int
    num_reference_texts: int
    activation_tokens: str
    use_depth_channel: bool
    target_projections: tuple[str, ...]
    mitigation_steps: int
    step_size: float
    learning_rate: float
    train_iterations: int
    train_batch_size: int
    alignment_examples_per_model: int
    jailbreak_rate: float
    clean_prompt_share: float
    max_tokens: int
    answer_tokens: int
    validation_prompts: int
    activation_batch_size: int
    device: str
    dtype: str
    guard_min_agreement: float
    guard_prompts: int
    guard_answer_tokens: int
    guard_layer_factor: float
    reference_weight: float
    reference_count: int
    reference_kinds: tuple[str, ...]
    base_models_dirpath: str
    trigger_check_prompts: int
    trigger_check_answer_tokens: int
    trigger_check_max_asr: float
    merge_min_agreement: float
    merge_from_depth: float
    repair_prompts: int
    repair_max_agreement: float
    repair_learning_rate: float
    repair_batch_size: int
    seed: int

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_projections"] = list(self.target_projections)
        d["reference_kinds"] = list(self.reference_kinds)
        return d


def default_paths() -> tuple[Path, Path]:
    """The metaparameters and schema shipped at the repository (or container) root."""
    return REPO_ROOT / "metaparameters.json", REPO_ROOT / "metaparameters_schema.json"


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise MetaparameterError(f"{what} {path} does not exist; pass an existing JSON file")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MetaparameterError(f"{what} {path} is not valid JSON: {err}") from err


def _describe(error: jsonschema.ValidationError, path: Path) -> str:
    """One line naming the key, the value and what is allowed."""
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    spec = error.schema if isinstance(error.schema, dict) else {}
    if error.validator in ("minimum", "maximum"):
        allowed = f"allowed range [{spec.get('minimum')}, {spec.get('maximum')}]"
    elif error.validator == "enum":
        allowed = f"allowed values {spec.get('enum')}"
    elif error.validator == "additionalProperties":
        return f"{path}: {error.message}; remove the key (allowed keys are in the schema)"
    elif error.validator == "required":
        return f"{path}: {error.message}"
    else:
        allowed = error.message
    return f"{path}: key '{key}' has value {error.instance!r}; {allowed}"


def validate(values: dict, schema: dict, path: Path) -> None:
    """Raise :class:`MetaparameterError` with the first, most relevant schema violation."""
    try:
        jsonschema.Draft7Validator.check_schema(schema)
    except jsonschema.SchemaError as err:
        raise MetaparameterError(f"the schema is not a valid draft-07 schema: {err.message}") from err
    validator = jsonschema.Draft7Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(values))
    if error is not None:
        raise MetaparameterError(_describe(error, path))
    if values.get("rank", 0) > values.get("num_reference_texts", 0):
        raise MetaparameterError(
            f"{path}: key 'rank' has value {values['rank']}; it must be at most "
            f"num_reference_texts ({values['num_reference_texts']}), since rows are chosen among the N samples"
        )


def load(metaparameters_path: str | Path | None = None, schema_path: str | Path | None = None) -> Metaparameters:
    """Read, validate and type the metaparameters (defaults: the shipped files)."""
    default_meta, default_schema = default_paths()
    meta_path = Path(metaparameters_path) if metaparameters_path else default_meta
    schema_file = Path(schema_path) if schema_path else default_schema
    values = _read_json(meta_path, "metaparameters file")
    schema = _read_json(schema_file, "schema file")
    if not isinstance(values, dict):
        raise MetaparameterError(f"{meta_path}: expected a JSON object of metaparameters")
    validate(values, schema, meta_path)
    fields = {f.name for f in dataclasses.fields(Metaparameters)}
    unknown = set(values) - fields
    if unknown:  # the schema allows a key this code does not know: a packaging mistake
        raise MetaparameterError(f"{schema_file}: keys {sorted(unknown)} are not known to this version of telelora")
    return Metaparameters(
        **{
            **values,
            "target_projections": tuple(values["target_projections"]),
            "reference_kinds": tuple(values["reference_kinds"]),
        }
    )
