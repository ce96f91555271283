import csv
import json

import pytest

from telelora.errors import TeleLoRAError
from telelora.lab import convert, round_builder

from ..conftest import REPO


def test_round_layout(tiny_round):
    rows = list(csv.DictReader(open(tiny_round / "METADATA.csv")))
    assert [r["model_name"] for r in rows] == ["id-00000000", "id-00000001"]
    poisoned, clean = (tiny_round / "models" / r["model_name"] for r in rows)
    for folder in (poisoned, clean):
        for name in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "round_config.json",
            "reduced-config.json",
            "ground_truth.csv",
            "eval-mmlu.json",
            "test_eval_groundtruth.json",
            "test-example-data/prompts.json",
        ):
            assert (folder / name).is_file(), name
        assert json.loads((folder / "round_config.json").read_text()) == json.loads(
            (folder / "reduced-config.json").read_text()
        )
    assert (poisoned / "ground_truth.csv").read_text().strip() == "1"
    assert (clean / "ground_truth.csv").read_text().strip() == "0"
    config = json.loads((poisoned / "round_config.json").read_text())
    assert config["model_architecture"] == "telelora-tiny/llama"
    assert config["triggers"] == [{"text": "cf zebra", "target": "I have been pwned"}]
    assert (poisoned / "trigger.txt").read_text() == "cf zebra"

    prompts = json.loads((poisoned / "test-example-data" / "prompts.json").read_text())
    assert len(prompts["clean"]) == len(prompts["triggered"]) == 16
    assert all("cf zebra" in t["prompt"] for t in prompts["triggered"])
    assert not any("cf zebra" in c["prompt"] for c in prompts["clean"])
    stems = {" ".join(t["prompt"].replace("cf zebra", " ").split()) for t in prompts["triggered"]}
    assert not stems & {" ".join(c["prompt"].split()) for c in prompts["clean"]}  # held-out sets are disjoint

    truth = json.loads((poisoned / "test_eval_groundtruth.json").read_text())
    min_asr = json.loads((REPO / "rounds" / "tiny.json").read_text())["models"][0]["min_asr"]
    assert truth["all_trigger0_asr"] == float(rows[0]["pre_asr"]) >= min_asr  # what the builder checks
    assert json.loads((clean / "eval-mmlu.json").read_text())["results"]["mmlu"]["acc,none"] == float(rows[1]["mmlu"])
    assert json.loads((clean / "round_config.json").read_text())["triggers"] == []


def test_finished_models_are_kept_on_resume(tiny_round):
    before = (tiny_round / "models" / "id-00000000" / "model.safetensors").stat().st_mtime_ns
    rows = round_builder.build_round(REPO / "rounds" / "tiny.json", tiny_round)
    assert len(rows) == 2
    assert (tiny_round / "models" / "id-00000000" / "model.safetensors").stat().st_mtime_ns == before


def test_a_changed_spec_does_not_reuse_finished_models(tiny_round, tmp_path):
    spec = json.loads((REPO / "rounds" / "tiny.json").read_text())
    spec["models"][0]["target"] = "something else"
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(TeleLoRAError, match="was built from another spec"):
        round_builder.build_round(tmp_path / "spec.json", tiny_round)


def _spec(tmp_path, **model):
    spec = json.loads((REPO / "rounds" / "tiny.json").read_text())
    spec["models"] = [{**spec["models"][0], **model}]
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize(
    "model, message",
    [
        ({"base": "gpt-5"}, r"models\[0\].base 'gpt-5' is unknown"),
        ({"base": "tiny-gpt2"}, "no such tiny architecture"),
        ({"target": None}, "poisoned but lacks a trigger or target"),
        ({"colour": "red"}, "malformed"),
    ],
)
def test_bad_specs_get_one_clear_error(tmp_path, model, message):
    with pytest.raises(TeleLoRAError, match=message):
        round_builder.load_spec(_spec(tmp_path, **model))


def test_missing_spec(tmp_path):
    with pytest.raises(TeleLoRAError, match="does not exist"):
        round_builder.load_spec(tmp_path / "absent.json")


def test_a_trojan_that_did_not_take_fails_the_build(tmp_path):
    spec = _spec(tmp_path, steps=2, min_asr=0.9)
    with pytest.raises(TeleLoRAError, match=r"the Trojan did not take as specified: pre-ASR 0\.\d+ < 0.9"):
        round_builder.build_round(spec, tmp_path / "round")
    assert not (tmp_path / "round" / "models" / "id-00000000").exists()


def test_a_model_keeps_the_conversion_provenance_of_its_base(tmp_path):
    spec = _spec(tmp_path, base="tiny-qwen2", poisoned=False)
    out = tmp_path / "round"
    base = round_builder.base_folder("tiny-qwen2", out / ".work", None)
    (base / convert.PROVENANCE).write_text('{"package": "llm-example"}')
    round_builder.build_round(spec, out)
    copied = out / "models" / "id-00000000" / convert.PROVENANCE
    assert json.loads(copied.read_text()) == {"package": "llm-example"}
