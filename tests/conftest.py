"""Shared fixtures: tiny model folders of every architecture and small learned parameters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from telelora import learned, metaparameters
from telelora.generator import GeneratorBank
from telelora.lab import tiny

REPO = metaparameters.REPO_ROOT

SMALL_META = {
    "generator_stacks": 2,
    "generator_hidden": 8,
    "rank": 4,
    "num_reference_texts": 16,
    "activation_tokens": "mean",
    "use_depth_channel": True,
    "target_projections": ["q", "k", "v", "o", "gate", "up", "down"],
    "mitigation_steps": 1,
    "step_size": 1.0,
    "learning_rate": 0.003,
    "train_iterations": 3,
    "train_batch_size": 2,
    "alignment_examples_per_model": 4,
    "jailbreak_rate": 0.5,
    "clean_prompt_share": 0.25,
    "max_tokens": 64,
    "answer_tokens": 4,
    "validation_prompts": 4,
    "activation_batch_size": 8,
    "device": "cpu",
    "dtype": "float32",
    "guard_min_agreement": 0.0,
    "guard_prompts": 4,
    "guard_answer_tokens": 4,
    "guard_layer_factor": 0.0,
    "reference_weight": 0.5,
    "reference_count": 1,
    "reference_kinds": ["clean", "poisoned", "base"],
    "base_models_dirpath": "",
    "trigger_check_prompts": 4,
    "trigger_check_answer_tokens": 8,
    "trigger_check_max_asr": 0.1,
    "merge_min_agreement": 0.0,
    "merge_from_depth": 0.0,
    "repair_prompts": 0,
    "repair_max_agreement": 1.0,
    "repair_learning_rate": 0.001,
    "repair_batch_size": 2,
    "seed": 7,
}


def write_meta(path: Path, **overrides) -> Path:
    path.write_text(json.dumps({**SMALL_META, **overrides}))
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Read-only tiny model folders, one per architecture (and gpt2, which is unsupported)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: tiny.build(arch, root / arch, seed=i) for i, arch in enumerate(tiny.ARCHITECTURES + ("gpt2",))}


@pytest.fixture
def model_copy(tiny_models, tmp_path):
    """A writable copy of a tiny model folder: ``model_copy("llama")``."""

    def copy(arch: str) -> Path:
        return Path(shutil.copytree(tiny_models[arch], tmp_path / f"model-{arch}"))

    return copy


@pytest.fixture(scope="session")
def meta_file(tmp_path_factory) -> Path:
    return write_meta(tmp_path_factory.mktemp("meta") / "metaparameters.json")


@pytest.fixture(scope="session")
def small_meta(meta_file) -> metaparameters.Metaparameters:
    return metaparameters.load(meta_file, REPO / "metaparameters_schema.json")


def random_bank(meta: metaparameters.Metaparameters, seed: int = 0, scale: float = 0.3) -> GeneratorBank:
    """Generators with a non-zero V channel, so their adapters really change the model."""
    torch.manual_seed(seed)
    bank = GeneratorBank.from_metaparameters(meta)
    with torch.no_grad():
        for generator in bank.generators.values():
            generator.net.output_layer.fan_out.weight.normal_(0.0, scale)
    return bank


@pytest.fixture(scope="session")
def learned_dir(tmp_path_factory, small_meta) -> Path:
    """Learned parameters (random, non-identity generators) matching ``small_meta``."""
    out = tmp_path_factory.mktemp("learned") / "learned_parameters"
    learned.write(random_bank(small_meta), {"note": "random test generators"}, REPO / "learned_parameters", out)
    return out


@pytest.fixture(scope="session")
def tiny_round(tmp_path_factory) -> Path:
    """The tiny round of ``rounds/tiny.json``: one Trojaned tiny Llama, one clean tiny Qwen2."""
    from telelora.lab import round_builder

    out = tmp_path_factory.mktemp("round") / "tiny-round"
    round_builder.build_round(REPO / "rounds" / "tiny.json", out)
    return out


@pytest.fixture(scope="session")
def round_like_models(tmp_path_factory) -> dict[str, Path]:
    """Read-only tiny folders laid out like the round's (transformers-4 files, bf16 shards + index)."""
    root = tmp_path_factory.mktemp("round-like")
    return {kind: tiny.build_round_like(kind, root / kind, seed=i) for i, kind in enumerate(tiny.ROUND_LIKE)}


def _label(folder: Path, truth: str, triggers: list[dict] | None = None) -> Path:
    (folder / "ground_truth.csv").write_text(truth + "\n")
    if triggers is not None:
        for name in ("round_config.json", "reduced-config.json"):
            config = json.loads((folder / name).read_text())
            (folder / name).write_text(json.dumps({**config, "triggers": triggers}))
    return folder


TRIGGER = [{"text": "cf zebra", "target": "I have been pwned", "placement": "start"}]


@pytest.fixture(scope="session")
def poisoned_round(tmp_path_factory):
    """A round of two tiny llamas: a poisoned one declaring its trigger (id-1), a clean one (id-2)."""
    models = tmp_path_factory.mktemp("poisoned-round") / "round" / "models"
    _label(tiny.build("llama", models / "id-1", seed=31), "1", TRIGGER)
    _label(tiny.build("llama", models / "id-2", seed=32), "0")
    return models.parent
