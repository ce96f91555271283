"""The repair after a merge (``telelora.repair``): the teacher is the input's own greedy answer
with its own distributions, the distillation moves the merged model back toward the input, the
written weights are the merge plus exactly the repair's change, and a repair that cannot run
leaves the plain merge."""

import contextlib
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from telelora import cli, guard, merge, mitigate, modelio, reference, repair
from telelora.alignment import collate, distill_loss
from telelora.architectures import find_adapted_layers
from telelora.chat import pad_id
from telelora.texts import load as load_texts

from .conftest import write_meta
from .test_merge import _scripted_rates
from .test_mitigate import _nist_args

CPU = torch.device("cpu")


def _loaded(model_dir):
    return modelio.load_model(model_dir, CPU, torch.float32), modelio.load_tokenizer(model_dir)


def _mean_loss(model, tokenizer, examples) -> float:
    with torch.no_grad():
        return float(distill_loss(model, collate(examples, pad_id(tokenizer), CPU)))


def test_the_teacher_is_the_input_itself(tiny_models, small_meta, learned_dir):
    model, tokenizer = _loaded(tiny_models["llama"])
    prompts = load_texts(learned_dir).alignment[:3]
    examples = repair.teacher_examples(model, tokenizer, prompts, small_meta)
    assert examples and all(len(e.target_ids) == len(e.answer) for e in examples)
    for e in examples:  # each answer token carries the input's top tokens there, most likely first
        assert all(p == sorted(p, reverse=True) and sum(p) <= 1 + 1e-5 for p in e.target_probs)
    assert _mean_loss(model, tokenizer, examples) == pytest.approx(0.0, abs=1e-5)  # the input: nothing to repair


def test_the_distillation_moves_the_merge_back_toward_the_input(tiny_models, poisoned_round, small_meta, learned_dir):
    model_dir = tiny_models["llama"]
    model, tokenizer = _loaded(model_dir)
    meta = dataclasses.replace(small_meta, repair_learning_rate=0.03, repair_batch_size=2)
    examples = repair.teacher_examples(model, tokenizer, load_texts(learned_dir).alignment[:16], meta)
    layers = find_adapted_layers(model, meta.target_projections)
    with reference.merged_in(model, model_dir, [poisoned_round / "models" / "id-2"], [0.5]):
        merged = _mean_loss(model, tokenizer, examples)
        delta, losses = repair.distil(model, tokenizer, layers, examples, meta)
        with delta.applied(layers):
            repaired = _mean_loss(model, tokenizer, examples)
    assert len(losses) == 8 and len(delta) == len(layers)
    assert merged > 0.01 and repaired < 0.85 * merged, (merged, repaired)
    assert model.training is False and not model.is_gradient_checkpointing


def test_each_epoch_passes_over_every_example_once_in_its_own_order(tiny_models, small_meta, learned_dir, monkeypatch):
    model_dir = tiny_models["llama"]
    model, tokenizer = _loaded(model_dir)
    meta = dataclasses.replace(small_meta, repair_batch_size=1)
    examples = repair.teacher_examples(model, tokenizer, load_texts(learned_dir).alignment[:6], meta)
    layers = find_adapted_layers(model, meta.target_projections)
    seen = []
    real_collate = repair.collate

    def recorded(batch, *args):
        seen.append(next(i for i, e in enumerate(examples) if e is batch[0]))
        return real_collate(batch, *args)

    monkeypatch.setattr(repair, "collate", recorded)
    _, once = repair.distil(model, tokenizer, layers, examples, meta)
    first, seen[:] = list(seen), []
    _, twice = repair.distil(model, tokenizer, layers, examples, meta, epochs=2)
    n = len(examples)
    assert len(once) == n and len(twice) == 2 * n
    assert seen[:n] == first and sorted(seen[n:]) == list(range(n)) and seen[n:] != first  # epoch 1 as before
    assert twice[0] == pytest.approx(once[0])
    with pytest.raises(ValueError, match="epochs"):
        repair.distil(model, tokenizer, layers, examples, meta, epochs=0)


def test_mitigate_writes_the_merge_plus_exactly_the_repairs_change(
    tmp_path, model_copy, learned_dir, poisoned_round, monkeypatch
):
    model_dir = model_copy("llama")
    seen = {}
    distil = repair.distil

    def recorded(*args, **kwargs):
        seen["delta"], losses = distil(*args, **kwargs)
        return seen["delta"], losses

    monkeypatch.setattr(repair, "distil", recorded)
    meta = write_meta(tmp_path / "meta.json", reference_kinds=["clean"], repair_prompts=6, repair_learning_rate=0.01)
    output = tmp_path / "out"
    argv = _nist_args(model_dir, output, meta, learned_dir, tmp_path, "--round_training_dataset_dirpath",
                      str(poisoned_round))  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads((output / mitigate.REPORT_FILE).read_text())
    assert report["method"] == "reference_merge" and report["reference_weight"] == 0.5
    assert report["merge_repair"]["prompts"] == 6 and report["merge_repair"]["steps"] == 3  # batches of 2
    assert report["merge_repair"]["skipped"] == "" and report["merge_repair"]["last_loss"] is not None
    mine = load_file(str(model_dir / "model.safetensors"))
    clean = load_file(str(poisoned_round / "models" / "id-2" / "model.safetensors"))
    written = load_file(str(output / "model.safetensors"))
    factors = seen["delta"].stacked()
    for key, value in mine.items():
        expected = 0.5 * value + 0.5 * clean[key]
        layer = key.removesuffix(".weight")
        if layer in factors:
            a, b = factors[layer]
            expected = expected + b @ a
        assert torch.allclose(written[key], expected, atol=1e-5), key
    assert sum(key.removesuffix(".weight") in factors for key in mine) == len(factors) > 0


def test_a_repair_out_of_memory_writes_the_plain_merge(tmp_path, model_copy, learned_dir, poisoned_round, monkeypatch,
                                                       capsys):  # fmt: skip
    model_dir = model_copy("llama")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(repair, "distil", out_of_memory)
    meta = write_meta(tmp_path / "meta.json", reference_kinds=["clean"], repair_prompts=4)
    output = tmp_path / "out"
    argv = _nist_args(model_dir, output, meta, learned_dir, tmp_path, "--round_training_dataset_dirpath",
                      str(poisoned_round))  # fmt: skip
    assert cli.main(argv) == 0
    assert "MERGE NOT REPAIRED (OutOfMemoryError" in capsys.readouterr().err
    report = json.loads((output / mitigate.REPORT_FILE).read_text())
    assert report["method"] == "reference_merge" and "OutOfMemoryError" in report["merge_repair"]["skipped"]
    mine = load_file(str(model_dir / "model.safetensors"))
    clean = load_file(str(poisoned_round / "models" / "id-2" / "model.safetensors"))
    written = load_file(str(output / "model.safetensors"))
    for key, value in mine.items():
        assert torch.allclose(written[key], 0.5 * value + 0.5 * clean[key], atol=1e-6), key


def test_with_the_trigger_check_the_repair_runs_on_the_weights_the_check_kept(
    tmp_path, tiny_models, poisoned_round, small_meta, learned_dir, monkeypatch
):
    """The repair trains on the merge at the weights the checks leave, after them."""
    model_dir = tiny_models["llama"]
    _scripted_rates(monkeypatch, [0.9, 0.0])
    weights_seen = []

    def recorded(model, tokenizer, layers, examples, meta):
        weights_seen.append(model.model.embed_tokens.weight.detach().clone())
        return repair.LowRankDelta(), [1.0]

    monkeypatch.setattr(repair, "distil", recorded)
    meta = dataclasses.replace(small_meta, reference_kinds=("poisoned",), repair_prompts=2)
    refs = reference.find_references(poisoned_round, model_dir, 1, ("poisoned",))
    plan = merge.plan_merge(model_dir, refs, meta, load_texts(learned_dir), lambda: _loaded(model_dir))
    assert plan.weights == [0.25] and plan.repair.steps == 1
    mine = load_file(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    theirs = load_file(str(poisoned_round / "models" / "id-1" / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.allclose(weights_seen[0], 0.75 * mine + 0.25 * theirs, atol=1e-6)


def _plan_with_reading(tiny_models, poisoned_round, small_meta, learned_dir, monkeypatch, reading, **meta_overrides):
    """The merge's plan with the gate's measured reading scripted to ``reading`` and the
    distillation recorded (not run)."""
    model_dir = tiny_models["llama"]
    calls = {"distil": 0, "measured": 0}

    def measured(*args, **kwargs):
        calls["measured"] += 1
        return reading

    def recorded(*args, **kwargs):
        calls["distil"] += 1
        return repair.LowRankDelta(), [1.0]

    monkeypatch.setattr(merge.guard, "agreement_with_input", measured)
    monkeypatch.setattr(repair, "distil", recorded)
    meta = dataclasses.replace(small_meta, reference_kinds=("clean",), repair_prompts=2, **meta_overrides)
    refs = reference.find_references(poisoned_round, model_dir, 1, ("clean",))
    plan = merge.plan_merge(model_dir, refs, meta, load_texts(learned_dir), lambda: _loaded(model_dir))
    return plan, calls


@pytest.mark.parametrize(("reading", "repaired"), [(0.95, False), (0.9, True), (0.85, True)])
def test_the_gate_repairs_only_a_merge_that_cost_the_inputs_answers(
    tiny_models, poisoned_round, small_meta, learned_dir, monkeypatch, reading, repaired
):
    plan, calls = _plan_with_reading(tiny_models, poisoned_round, small_meta, learned_dir, monkeypatch,
                                     reading, repair_max_agreement=0.9)  # fmt: skip
    assert plan.weights == [0.5] and plan.repair.merge_agreement == reading
    assert calls == {"distil": int(repaired), "measured": 1}
    if repaired:
        assert plan.repair.skipped == "" and plan.repair.steps == 1
    else:
        assert "repair_max_agreement 0.9" in plan.repair.skipped and plan.repair.delta is None
        assert plan.repair.report()["steps"] == 0


def test_an_open_gate_measures_nothing(tiny_models, poisoned_round, small_meta, learned_dir, monkeypatch):
    plan, calls = _plan_with_reading(tiny_models, poisoned_round, small_meta, learned_dir, monkeypatch, 0.99)
    assert calls == {"distil": 1, "measured": 0} and plan.repair.merge_agreement is None


def test_with_the_merge_guard_on_the_gate_reads_the_guards_agreement(
    tiny_models, poisoned_round, small_meta, learned_dir, monkeypatch
):
    plan, calls = _plan_with_reading(tiny_models, poisoned_round, small_meta, learned_dir, monkeypatch,
                                     0.0, repair_max_agreement=0.0, merge_min_agreement=0.01)  # fmt: skip
    assert calls["measured"] == 0 and plan.drift_guard.applied
    assert plan.repair.merge_agreement == plan.drift_guard.agreement > 0.0
    assert calls["distil"] == 0 and "repair_max_agreement 0.0" in plan.repair.skipped


def test_the_gates_reading_of_an_unchanged_model_is_full_agreement(tiny_models, learned_dir):
    model, tokenizer = _loaded(tiny_models["llama"])
    prompts = load_texts(learned_dir).alignment[:3]
    assert guard.agreement_with_input(model, tokenizer, contextlib.nullcontext(), prompts, 4, 2) == 1.0
