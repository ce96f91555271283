"""Fixtures of the lab's tests: a tiny farm, built once per session."""

import json

import pytest

from telelora.lab import farm

# a farm small enough for tests: a tiny Llama base that learns a Trojan in a few seconds
TINY = {
    "name": "tiny-farm",
    "seed": 3,
    "bases": {"tiny-llama": {"trojans": 3, "clean_finetunes": 1}},
    "splits": {"train": 0.34, "validation": 0.33, "test": 0.33},
    "behaviours": ["replace"],
    "trigger_kinds": ["rare"],
    "placements": ["start"],
    "asr_bands": [0.95],
    "asr_tolerance": 0.45,
    "lora_ranks": [16],
    "lora_layers": ["all"],
    "poison_rates": [0.5, 0.5],
    "train_prompts": 48,
    "check_prompts": 8,
    "probe_prompts": 8,
    "answer_tokens": 4,
    "learning_rate": 0.01,
    "batch_size": 16,
    "max_steps": 300,
    "probe_every": 20,
    "finetune_steps": 4,
    "max_attempts": 2,
    "max_false_trigger": 1.0,
    "min_agreement": 0.0,
}


@pytest.fixture(scope="session")
def tiny_farm(tmp_path_factory):
    root = tmp_path_factory.mktemp("farm")
    spec = root / "spec.json"
    spec.write_text(json.dumps(TINY))
    records = farm.build(spec, root / "out", cache_dir=root / "cache")
    return spec, root, records
