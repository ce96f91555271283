"""The merge route's checks before anything is written: the trigger check of poisoned
references (their declared Trojan must not fire on the merged model), the drift guard, and
what ``mitigate`` writes and reports after them, falling back to the generators when they
drop every reference or the merge fails."""

import dataclasses
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from telelora import cli, merge, mitigate, modelio, reference
from telelora.alignment import place_trigger
from telelora.chat import hit_rate
from telelora.texts import load as load_texts

from .conftest import write_meta
from .test_mitigate import _nist_args

CPU = torch.device("cpu")


def _loader(model_dir):
    calls = []

    def load():
        calls.append(1)
        return modelio.load_model(model_dir, CPU, torch.float32), modelio.load_tokenizer(model_dir)

    return load, calls


def _scripted_rates(monkeypatch, rates: list[float]):
    """``declared_asr`` answering ``rates`` in turn, and recording one weight of the model it saw."""
    seen = []

    def scripted(model, tokenizer, triggers, prompts, meta):
        seen.append(model.model.embed_tokens.weight.detach().clone())
        return rates[len(seen) - 1]

    monkeypatch.setattr(merge, "declared_asr", scripted)
    return seen


def _refs(round_dir, model_dir, meta):
    return reference.find_references(round_dir, model_dir, meta.reference_count, tuple(meta.reference_kinds))


def test_a_clean_merge_without_the_guard_builds_no_model(poisoned_round, tiny_models, small_meta, learned_dir):
    meta = dataclasses.replace(small_meta, reference_kinds=("clean",))
    load, calls = _loader(tiny_models["llama"])
    plan = merge.plan_merge(tiny_models["llama"], _refs(poisoned_round, tiny_models["llama"], meta), meta,
                            load_texts(learned_dir), load)  # fmt: skip
    assert not calls and plan.weights == [meta.reference_weight] and not plan.trigger_checks
    assert not plan.drift_guard.applied


@pytest.mark.parametrize(
    ("rates", "weights", "kept"),
    [
        ([0.0], [0.5], 0.5),  # silent at once: kept whole
        ([0.9, 0.05], [0.5, 0.25], 0.25),  # halved once, then silent
        ([0.9, 0.9, 0.9], [0.5, 0.25, 0.125], 0.0),  # fires at every weight tried: dropped
    ],
)
def test_the_trigger_check_halves_then_drops_a_reference_whose_trojan_fires(
    poisoned_round, tiny_models, small_meta, learned_dir, monkeypatch, rates, weights, kept
):
    model_dir = tiny_models["llama"]
    meta = dataclasses.replace(small_meta, reference_kinds=("poisoned",), trigger_check_max_asr=0.1)
    seen = _scripted_rates(monkeypatch, rates)
    load, calls = _loader(model_dir)
    refs = _refs(poisoned_round, model_dir, meta)
    plan = merge.plan_merge(model_dir, refs, meta, load_texts(learned_dir), load)
    (check,) = plan.trigger_checks
    assert [t["weight"] for t in check.tried] == weights and [t["asr"] for t in check.tried] == rates
    assert check.weight == kept and plan.weights == [kept] and plan.merges == (kept > 0) and len(calls) == 1
    assert check.triggers == ["cf zebra"]
    # each rate was measured on the model merged at the weight being tried
    mine = load_file(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    theirs = load_file(str(refs[0].path / "model.safetensors"))["model.embed_tokens.weight"]
    for weight, embedding in zip(weights, seen, strict=True):
        assert torch.allclose(embedding, torch.lerp(mine, theirs, weight), atol=1e-6)


def test_the_trigger_check_measures_the_real_trojan_of_the_merged_model(tiny_round, tiny_models, small_meta,
                                                                         learned_dir):  # fmt: skip
    """The tiny round's Trojaned llama declares "cf zebra" -> "I have been pwned": merged in
    whole (w = 1) it fires; each figure the check records is the hit rate of the model merged
    at that weight, measured here independently."""
    model_dir = tiny_models["llama"]
    meta = dataclasses.replace(small_meta, reference_kinds=("poisoned",), reference_weight=1.0, trigger_check_prompts=8)
    refs = _refs(tiny_round, model_dir, meta)
    assert [r.kind for r in refs] == ["poisoned"] and refs[0].triggers[0].target == "I have been pwned"
    texts = load_texts(learned_dir)
    plan = merge.plan_merge(model_dir, refs, meta, texts, _loader(model_dir)[0])
    (check,) = plan.trigger_checks
    assert check.tried[0]["weight"] == 1.0 and check.tried[0]["asr"] > meta.trigger_check_max_asr
    trigger = refs[0].triggers[0]
    rng = random.Random(meta.seed)  # the check's own placement of the trigger
    prompts = [place_trigger(p, trigger.text, trigger.placement, rng) for p in texts.alignment[:8]]
    tok = modelio.load_tokenizer(model_dir)
    for tried in check.tried:
        model = modelio.load_model(model_dir, CPU, torch.float32)
        reference.merge_into(model, model_dir, [refs[0].path], tried["weight"])
        budget = meta.trigger_check_answer_tokens
        rate = hit_rate(model, tok, prompts, [trigger.target], meta.activation_batch_size, None, budget)
        assert tried["asr"] == pytest.approx(rate)


def test_the_drift_guard_scales_every_weight_down_until_the_answers_agree(
    poisoned_round, tiny_models, small_meta, learned_dir
):
    """Two unrelated random tiny llamas: merged halfway, the answers fall apart."""
    model_dir = tiny_models["llama"]
    meta = dataclasses.replace(small_meta, reference_kinds=("clean",), merge_min_agreement=0.95, guard_prompts=4)
    plan = merge.plan_merge(model_dir, _refs(poisoned_round, model_dir, meta), meta, load_texts(learned_dir),
                            _loader(model_dir)[0])  # fmt: skip
    guard = plan.drift_guard
    assert guard.applied and guard.agreement_unscaled < 0.95 <= guard.agreement and 0 <= guard.scale < 1
    assert plan.weights == [pytest.approx(meta.reference_weight * guard.scale)]


@pytest.mark.parametrize("from_depth", [0.0, 0.5])
def test_mitigate_reports_the_checks_and_writes_the_checked_weights(
    tmp_path, model_copy, learned_dir, poisoned_round, monkeypatch, from_depth
):
    model_dir = model_copy("llama")
    _scripted_rates(monkeypatch, [0.9, 0.0])
    meta = write_meta(tmp_path / "meta.json", reference_count=2, merge_min_agreement=0.01, merge_from_depth=from_depth)
    output = tmp_path / "out"
    argv = _nist_args(model_dir, output, meta, learned_dir, tmp_path, "--round_training_dataset_dirpath",
                      str(poisoned_round))  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads((output / mitigate.REPORT_FILE).read_text())
    assert report["method"] == "reference_merge" and report["mitigated"]
    assert report["reference_kinds"] == ["clean", "poisoned"]
    assert report["reference_weights"] == [0.25, 0.125] and report["reference_weight"] == 0.375
    assert report["trigger_checks"][0]["tried"] == [{"weight": 0.25, "asr": 0.9}, {"weight": 0.125, "asr": 0.0}]
    assert report["merge_drift_guard"]["applied"] and report["merge_drift_guard"]["scale"] == 1.0
    # two trigger-check tries and the guard's one, all from RAM
    assert report["merge_trial"]["held_on"] == "cpu"  # one read per reference
    assert report["merge_trial"]["tries"] == 3
    assert {"load", "merge_checks", "merge_and_save"} <= set(report["seconds"])
    assert report["merge_from_depth"] == from_depth
    mine = load_file(str(model_dir / "model.safetensors"))
    clean, poisoned = (load_file(str(poisoned_round / "models" / n / "model.safetensors")) for n in ("id-2", "id-1"))
    written = load_file(str(output / "model.safetensors"))
    picked = reference.merged_tensors(mine, from_depth)
    assert (len(picked) == len(mine)) == (from_depth == 0)
    for key, value in mine.items():
        expected = 0.625 * value + 0.25 * clean[key] + 0.125 * poisoned[key] if key in picked else value
        assert torch.allclose(written[key], expected, atol=1e-6), key


def test_every_reference_dropped_runs_the_generators(tmp_path, model_copy, learned_dir, poisoned_round, monkeypatch,
                                                     capsys):  # fmt: skip
    model_dir = model_copy("llama")
    _scripted_rates(monkeypatch, [0.9, 0.9, 0.9])
    meta = write_meta(tmp_path / "meta.json", reference_kinds=["poisoned"])
    argv = _nist_args(model_dir, tmp_path / "out", meta, learned_dir, tmp_path, "--round_training_dataset_dirpath",
                      str(poisoned_round))  # fmt: skip
    assert cli.main(argv) == 0
    assert "MERGE DROPPED" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / mitigate.REPORT_FILE).read_text())
    assert report["mitigated"] and report["method"] == "generators" and report["num_layers_adapted"] > 0
    assert "dropped every reference" in report["route_reason"] and report["reference_weights"] == [0.0]


def test_a_merge_that_fails_runs_the_generators_and_never_costs_the_output(
    tmp_path, model_copy, learned_dir, poisoned_round, monkeypatch, capsys
):
    model_dir = model_copy("llama")

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(merge, "save_merge", broken)
    argv = _nist_args(model_dir, tmp_path / "out", write_meta(tmp_path / "meta.json"), learned_dir, tmp_path,
                      "--round_training_dataset_dirpath", str(poisoned_round))  # fmt: skip
    assert cli.main(argv) == 0
    assert "MERGE FAILED (OSError: No space left on device)" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / mitigate.REPORT_FILE).read_text())
    assert report["mitigated"] and report["method"] == "generators"
