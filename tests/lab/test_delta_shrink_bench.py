"""The delta-shrink bench: c = 0 gives the base back (or the reference), c = 1 the Trojan, a tiny farm end to end."""

import json

import pytest
import torch

from bench import delta_shrink as bench
from telelora import modelio
from telelora.lab import farm
from telelora.lab.round_builder import base_folder


def _validation_trojan(root):
    spec = farm.load_spec(root / "out" / "farm_spec.json")
    return next(m for m in farm.plan(spec) if m.split == "validation" and m.poisoned)


@pytest.fixture(scope="module")
def validation_round(tiny_farm, tmp_path_factory):
    _, root, _ = tiny_farm
    return farm.materialize(root / "out", tmp_path_factory.mktemp("val") / "round", "validation", root / "cache")


def test_no_shrink_is_the_trojan_and_full_shrink_the_base(tiny_farm, validation_round):
    _, root, _ = tiny_farm
    model_spec = _validation_trojan(root)
    folder = validation_round / "models" / model_spec.model_id
    factors = farm.load_change(root / "out" / "models" / model_spec.model_id)
    trojan = dict(modelio.load_model(folder, torch.device("cpu"), torch.float32).named_parameters())
    base_dir = base_folder(model_spec.base, root / "out" / ".work", root / "cache")
    base = dict(modelio.load_model(base_dir, torch.device("cpu"), torch.float32).named_parameters())
    kept = dict(bench.shrunk(folder, factors, 1.0).named_parameters())
    gone = dict(bench.shrunk(folder, factors, 0.0).named_parameters())
    assert all(torch.equal(kept[n], trojan[n]) for n in trojan)
    changed = [n for n in factors if not torch.equal(trojan[n], base[n])]
    assert changed
    for name in changed:  # the merged weights were rounded once: back to the base up to that
        assert torch.allclose(gone[name], base[name], atol=1e-2)
        assert (gone[name] - base[name]).abs().max() < (trojan[name] - base[name]).abs().max()


def _clean_finetune(root):
    spec = farm.load_spec(root / "out" / "farm_spec.json")
    return next(m for m in farm.plan(spec) if m.kind == "clean_finetune")


def test_merging_with_a_reference_fine_tune_trades_the_trojans_change_for_the_references(tiny_farm, validation_round):
    _, root, _ = tiny_farm
    model_spec = _validation_trojan(root)
    folder = validation_round / "models" / model_spec.model_id
    factors = farm.load_change(root / "out" / "models" / model_spec.model_id)
    reference = farm.load_change(root / "out" / "models" / _clean_finetune(root).model_id)
    assert reference
    alone = dict(bench.shrunk(folder, factors, 0.5).named_parameters())
    merged = dict(bench.shrunk(folder, factors, 0.5, reference).named_parameters())
    for name, weight in alone.items():
        expected = (
            weight + 0.5 * (reference[name][1].float() @ reference[name][0].float()) if name in reference else weight
        )
        assert torch.allclose(merged[name], expected, atol=1e-6)
    kept = dict(bench.shrunk(folder, factors, 1.0, reference).named_parameters())
    trojan = dict(modelio.load_model(folder, torch.device("cpu"), torch.float32).named_parameters())
    assert all(torch.equal(kept[n], trojan[n]) for n in trojan)  # c = 1: the Trojan, whatever the reference


def test_on_a_tiny_farm_it_measures_each_factor_and_writes_json(tiny_farm, validation_round, tmp_path):
    _, root, _ = tiny_farm
    model_id = _validation_trojan(root).model_id
    out = tmp_path / "shrink.json"
    bench.main(["--farm", str(root / "out"), "--round", str(validation_round), "--models", model_id,
                "--factors", "1", "0", "--num_samples", "4", "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["c"], r["reference"]) for r in rows] == [(model_id, 1.0, None), (model_id, 0.0, None)]
    assert all(0 <= r["asr"] <= 1 and 0 <= r["agreement"] <= 1 for r in rows)
    reference_id = _clean_finetune(root).model_id
    bench.main(["--farm", str(root / "out"), "--round", str(validation_round), "--models", model_id,
                "--factors", "0.5", "--num_samples", "4", "--references", reference_id, "--out", str(out)])  # fmt: skip
    assert [(r["c"], r["reference"]) for r in json.loads(out.read_text())["rows"]] == [(0.5, reference_id)]


def test_test_split_models_bad_factors_and_unknown_models_are_one_line(tiny_farm, validation_round):
    _, root, _ = tiny_farm
    spec = farm.load_spec(root / "out" / "farm_spec.json")
    test_id = next(m.model_id for m in farm.plan(spec) if m.split == "test" and m.poisoned)
    common = ["--farm", str(root / "out"), "--round", str(validation_round), "--models"]
    with pytest.raises(SystemExit, match="test-split"):
        bench.main([*common, test_id])
    with pytest.raises(SystemExit, match="not a built Trojan"):
        bench.main([*common, "id-99999999"])
    with pytest.raises(SystemExit, match=r"\[0, 1\]"):
        bench.main([*common, test_id, "--factors", "1.5"])
    trojan_id, clean_id = _validation_trojan(root).model_id, _clean_finetune(root).model_id
    with pytest.raises(SystemExit, match="not a built clean fine-tune"):
        bench.main([*common, trojan_id, "--references", trojan_id])
    with pytest.raises(SystemExit, match="are both of base tiny-llama"):
        bench.main([*common, trojan_id, "--references", clean_id, clean_id])
