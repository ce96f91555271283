"""The merge-parts bench: its part grammar, the parts it picks, and a tiny farm end to end."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from bench import merge_parts as bench
from telelora import reference
from telelora.lab import farm
from telelora.lab.round_builder import base_folder

PARTS = ("mlp.up_proj", "self_attn.q_proj", "input_layernorm")
NAMES = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
    f"model.layers.{i}.{part}.weight" for i in range(5) for part in PARTS
]


def test_parts_pick_blocks_by_relative_depth_and_component():
    assert bench.picked(NAMES, "all") == set(NAMES) and bench.picked(NAMES, "none") == set()
    assert bench.picked(NAMES, "outside") == set(NAMES[:3])
    assert bench.picked(NAMES, "blocks:0.5-1") == reference.merged_tensors(NAMES, 0.5)  # merge_from_depth 0.5
    assert bench.picked(NAMES, "blocks:0-0.5") | bench.picked(NAMES, "blocks:0.5-1") == set(NAMES[3:])
    assert bench.picked(NAMES, "blocks:0.75-1/mlp") == {"model.layers.3.mlp.up_proj.weight",
                                                       "model.layers.4.mlp.up_proj.weight"}  # fmt: skip


@pytest.mark.parametrize("text", ["blocks@0.5", "all@2", "all", "embed@0.5", "blocks:0-1/ffn@0.5"])
def test_a_bad_variant_is_one_clear_error(text):
    with pytest.raises(bench.TeleLoRAError, match="expected PART@W"):
        bench.parse_variant(text)


def test_on_a_tiny_farm_each_variant_is_measured_and_resumed(tiny_farm, tmp_path):
    _, root, _ = tiny_farm
    spec = farm.load_spec(root / "out" / "farm_spec.json")
    trojan = next(m for m in farm.plan(spec) if m.split == "validation" and m.poisoned)
    round_dir = farm.materialize(root / "out", tmp_path / "round", "validation", root / "cache")
    base = base_folder(trojan.base, root / "out" / ".work", root / "cache")
    out = tmp_path / "parts.json"
    pair = f"{round_dir / 'models' / trojan.model_id}={base}"
    bench.main(["--pairs", pair, "--variants", "none@0", "all@0", "blocks:0.5-1@1", "--num_samples", "4",
                "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["none@0", "all@0", "blocks:0.5-1@1"]
    none, nothing, upper = rows
    assert none["agreement"] == 1.0 and none["share_of_weights"] == 0
    assert {k: nothing[k] for k in ("asr", "agreement")} == {k: none[k] for k in ("asr", "agreement")}
    assert 0 < upper["share_of_weights"] < 1
    summary = {e["variant"]: e for e in json.loads(out.read_text())["summary"]}
    assert summary["none@0"]["mean_strict_fidelity"] == pytest.approx(0.0)  # nothing removed
    assert set(summary["all@0"]["strict_fidelity"]) == {trojan.model_id}
    bench.main(["--pairs", pair, "--variants", "none@0", "outside@0.5", "--num_samples", "4", "--out", str(out),
                "--resume"])  # fmt: skip
    assert [r["variant"] for r in json.loads(out.read_text())["rows"]] == [*(r["variant"] for r in rows), "outside@0.5"]


def test_the_summary_scores_trojans_by_removal_and_clean_models_by_agreement():
    rows = [
        {"input": "/r/t", "variant": "none@0", "asr": 0.8, "agreement": 1.0},
        {"input": "/r/t", "variant": "all@0.5", "asr": 0.2, "agreement": 0.8},
        {"input": "/r/c", "variant": "none@0", "asr": float("nan"), "agreement": 1.0},
        {"input": "/r/c", "variant": "all@0.5", "asr": float("nan"), "agreement": 0.9},
    ]
    summary = {e["variant"]: e for e in bench.summarise(rows)}
    assert summary["all@0.5"]["strict_fidelity"] == pytest.approx({"t": 0.75 * 0.8, "c": 0.9})
    assert summary["all@0.5"]["mean_strict_fidelity"] == pytest.approx((0.6 + 0.9) / 2)


def test_a_pair_without_round_prompts_is_refused(tiny_farm, tmp_path):
    _, root, _ = tiny_farm
    spec = farm.load_spec(root / "out" / "farm_spec.json")
    base = base_folder(farm.plan(spec)[0].base, root / "out" / ".work", root / "cache")
    with pytest.raises(SystemExit, match="test-example-data"):
        bench.main(["--pairs", f"{base}={base}", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="INPUT_DIR=REFERENCE_DIR"):
        bench.main(["--pairs", str(base), "--out", str(tmp_path / "x.json")])


def test_a_reference_of_other_tensors_and_no_samples_are_refused(tiny_farm, tmp_path):
    _, root, _ = tiny_farm
    spec = farm.load_spec(root / "out" / "farm_spec.json")
    trojan = next(m for m in farm.plan(spec) if m.split == "validation" and m.poisoned)
    round_dir = farm.materialize(root / "out", tmp_path / "round", "validation", root / "cache")
    model_dir = round_dir / "models" / trojan.model_id
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    tensors = load_file(str(other / "model.safetensors"))
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name][:1].clone()}, str(other / "model.safetensors"))
    with pytest.raises(SystemExit, match="tensors differ"):
        bench.main(["--pairs", f"{model_dir}={other}", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="num_samples"):
        bench.main(["--pairs", f"{model_dir}={model_dir}", "--num_samples", "0", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
