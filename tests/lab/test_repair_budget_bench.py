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
    for row in rows:  # each clean prompt's agreement kept, for paired comparisons
        per_prompt = row["agreement_per_prompt"]
        assert 0 < len(per_prompt) <= 4 and sum(per_prompt) / len(per_prompt) == pytest.approx(row["agreement"])
    bench.main([*argv, "--variants", "0x0", "2x1", "--baseline", "4x1"])  # resumed: only the new variant
    resumed = json.loads(out.read_text())
    assert [r["variant"] for r in resumed["rows"]] == ["input", "0x0", "4x1", "4x2", "2x1"]
    assert resumed["rows"][-1]["examples"] <= once["examples"]
    summary = {e["variant"]: e for e in resumed["summary"]}
    assert set(summary) == {"0x0", "4x1", "4x2", "2x1"}
    assert trojan.model_id in summary["0x0"]["agreement"]
    paired = summary["4x2"]["agreement_minus_4x1"][trojan.model_id]
    assert paired["mean"] == pytest.approx(twice["agreement"] - once["agreement"], abs=1e-9)


def test_the_summary_pairs_each_variant_with_the_baseline_prompt_by_prompt():
    rows = [
        {"model": "/r/c", "variant": "input", "asr": float("nan"), "agreement": 1.0, "agreement_per_prompt": [1.0] * 4},
        {"model": "/r/c", "variant": "0x0", "asr": float("nan"), "agreement": 0.5, "agreement_per_prompt": [0.5] * 4},
        {"model": "/r/c", "variant": "256x1", "asr": float("nan"), "agreement": 0.8,
         "agreement_per_prompt": [0.6, 0.8, 0.8, 1.0]},
        {"model": "/r/t", "variant": "input", "asr": 0.8, "agreement": 1.0},  # an older row: no per-prompt figures
        {"model": "/r/t", "variant": "0x0", "asr": 0.2, "agreement": 0.8},
    ]  # fmt: skip
    summary = {e["variant"]: e for e in bench.summarise(rows, baseline="256x1")}
    assert summary["0x0"]["strict_fidelity"] == pytest.approx({"c": 0.5, "t": 0.75 * 0.8})
    difference = summary["0x0"]["agreement_minus_256x1"]["c"]
    assert difference["mean"] == pytest.approx(-0.3) and difference["low"] <= -0.3 <= difference["high"]
    assert summary["0x0"]["agreement"]["c"]["mean"] == pytest.approx(0.5) and "t" not in summary["0x0"]["agreement"]
    assert "agreement_minus_256x1" not in summary["256x1"]  # the baseline is not compared with itself


def test_a_pair_without_round_prompts_is_refused(tiny_farm, tmp_path):
    _, root, _ = tiny_farm
    spec = farm.load_spec(root / "out" / "farm_spec.json")
    base = base_folder(farm.plan(spec)[0].base, root / "out" / ".work", root / "cache")
    with pytest.raises(SystemExit, match="test-example-data"):
        bench.main(["--pairs", f"{base}:{root / 'out'}", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="expected MODEL_DIR:ROUND_DIR"):
        bench.main(["--pairs", str(root), "--out", str(tmp_path / "x.json")])


def test_an_unreadable_out_file_is_one_clear_error_and_kept(tmp_path):
    out = tmp_path / "budget.json"
    out.write_text("{not json")
    with pytest.raises(SystemExit, match=r"^error: --out .* cannot be resumed"):
        bench.main(["--pairs", f"{tmp_path}:{tmp_path}", "--out", str(out)])
    assert out.read_text() == "{not json"
