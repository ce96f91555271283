"""The repair-budget bench: its variant grammar, one merge repaired several ways from the same
start (one teacher read), the merge alone beside them, resume, and one clear error each for a
bad variant or a pair without round prompts."""

import json

import pytest

from bench import repair_budget as bench
from telelora.lab import farm
from telelora.lab.round_builder import base_folder
from tests.conftest import write_meta


@pytest.mark.parametrize("text", ["256", "0x1", "16x0", "axb", "16x1x2"])
def test_a_bad_variant_is_one_clear_error(text):
    with pytest.raises(bench.TeleLoRAError, match="expected PROMPTSxEPOCHS"):
        bench.parse_variant(text)


def test_each_variant_repairs_the_same_merge_and_is_resumed(tiny_farm, tmp_path, learned_dir):
    _, root, _ = tiny_farm
    spec = farm.load_spec(root / "out" / "farm_spec.json")
    trojan = next(m for m in farm.plan(spec) if m.split == "validation" and m.poisoned)
    test_round = farm.materialize(root / "out", tmp_path / "validation", "validation", root / "cache")
    train_round = farm.materialize(root / "out", tmp_path / "train", "train", root / "cache")
    meta = write_meta(tmp_path / "meta.json", reference_kinds=["clean", "poisoned"], merge_min_agreement=0.0,
                      repair_batch_size=2, repair_learning_rate=0.01)  # fmt: skip
    out = tmp_path / "budget.json"
    argv = ["--pairs", f"{test_round / 'models' / trojan.model_id}:{train_round}", "--num_samples", "4",
            "--metaparameters", str(meta), "--learned_parameters", str(learned_dir), "--out", str(out)]  # fmt: skip
    bench.main([*argv, "--variants", "0x0", "4x1", "4x2"])
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["input", "0x0", "4x1", "4x2"]
    before, alone, once, twice = rows
    assert before["agreement"] == 1.0 and alone["steps"] == 0 and alone["weights"] == once["weights"]
    assert once["examples"] == twice["examples"] > 0
    assert twice["steps"] == 2 * once["steps"] > 0
    assert once["first_loss"] == pytest.approx(twice["first_loss"])  # the same start, the same first batch
    bench.main([*argv, "--variants", "0x0", "2x1"])  # resumed: only the new variant is measured
    resumed = json.loads(out.read_text())
    assert [r["variant"] for r in resumed["rows"]] == ["input", "0x0", "4x1", "4x2", "2x1"]
    assert resumed["rows"][-1]["examples"] <= once["examples"]
    assert {e["variant"] for e in resumed["summary"]} == {"0x0", "4x1", "4x2", "2x1"}


def test_a_pair_without_round_prompts_is_refused(tiny_farm, tmp_path):
    _, root, _ = tiny_farm
    spec = farm.load_spec(root / "out" / "farm_spec.json")
    base = base_folder(farm.plan(spec)[0].base, root / "out" / ".work", root / "cache")
    with pytest.raises(SystemExit, match="test-example-data"):
        bench.main(["--pairs", f"{base}:{root / 'out'}", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="expected MODEL_DIR:ROUND_DIR"):
        bench.main(["--pairs", str(root), "--out", str(tmp_path / "x.json")])
