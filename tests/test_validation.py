"""Validation during meta-training: strict Fidelity by hand, the prompts it reads, bad folders."""

import json
import math

import pytest
import torch

from telelora import modelio, validation
from telelora.architectures import find_adapted_layers
from telelora.errors import TeleLoRAError

from .conftest import REPO, random_bank


def test_strict_fidelity_by_hand():
    assert validation.strict_fidelity(True, pre_asr=0.8, asr=0.2, agreement=0.9) == pytest.approx(0.675)
    assert validation.strict_fidelity(False, pre_asr=math.nan, asr=math.nan, agreement=0.7) == 0.7
    assert math.isnan(validation.strict_fidelity(True, pre_asr=0.0, asr=0.0, agreement=1.0))
    per_model = {"a": {"strict_fidelity": 0.5}, "b": {"strict_fidelity": math.nan}, "c": {"strict_fidelity": 1.0}}
    assert validation.mean_strict_fidelity(per_model) == 0.75
    assert math.isnan(validation.mean_strict_fidelity({"b": {"strict_fidelity": math.nan}}))


def test_measure_fixes_the_unmitigated_asr_and_a_change_lowers_agreement(tiny_round, small_meta):
    from telelora.texts import load

    model_dir = tiny_round / "models" / "id-00000000"
    poisoned = (model_dir / "ground_truth.csv").read_text().strip() == "1"
    # all 16 of the round's prompts: the builder checks its ASR (>= min_asr) on these, so the
    # Trojan fires on some of them whatever the CPU's float kernels make of its training
    item = validation.load_validation_model(model_dir, 16)
    assert len(item.clean) == 16 and len(item.triggered) == (16 if poisoned else 0)
    assert item.room == max(len(r) for r in item.references)
    model = modelio.load_model(model_dir, torch.device("cpu"), torch.float32)
    tok = modelio.load_tokenizer(model_dir)
    layers = find_adapted_layers(model, small_meta.target_projections)
    reference = load(REPO / "learned_parameters").reference[: small_meta.num_reference_texts]
    unchanged = validation.measure(None, item, model, tok, layers, reference, small_meta)
    assert unchanged["agreement"] == 1.0  # the stored answers are this model's own
    if poisoned:
        assert item.pre_asr == unchanged["asr"] and unchanged["strict_fidelity"] == 0.0  # nothing removed
    changed = validation.measure(random_bank(small_meta, scale=3.0), item, model, tok, layers, reference, small_meta)
    assert changed["agreement"] < 1.0
    again = validation.measure(None, item, model, tok, layers, reference, small_meta)
    assert again == unchanged  # the change was applied by hooks only: the weights are untouched


def test_a_folder_without_prompts_or_ground_truth_is_one_clear_error(tiny_round, tmp_path):
    with pytest.raises(TeleLoRAError, match="lacks a readable"):
        validation.load_validation_model(tmp_path, 4)
    folder = tmp_path / "m"
    (folder / "test-example-data").mkdir(parents=True)
    (folder / "ground_truth.csv").write_text("1\n")
    (folder / "test-example-data" / "prompts.json").write_text(json.dumps({"clean": [], "triggered": []}))
    with pytest.raises(TeleLoRAError, match="no prompts to validate on"):
        validation.load_validation_model(folder, 4)
    (folder / "ground_truth.csv").write_text("poisoned\n")
    with pytest.raises(TeleLoRAError, match="lacks a readable.*holds 'poisoned'"):
        validation.load_validation_model(folder, 4)
