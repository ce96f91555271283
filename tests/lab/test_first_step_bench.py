"""The first-step bench: a real descent direction on the tiny round, and its bad inputs."""

import json

import pytest

from bench import first_step as bench
from tests.conftest import write_meta


def _run(tmp_path, tiny_round, *flags):
    meta = write_meta(tmp_path / "meta.json", alignment_examples_per_model=6, answer_tokens=16)
    out = tmp_path / "first_step.json"
    argv = ["--models_dirpath", str(tiny_round), "--metaparameters", str(meta), "--scratch", str(tmp_path / "s")]
    bench.main(argv + ["--out", str(out), "--needs_change", "1e-5", *flags])
    return json.loads(out.read_text())


def test_the_walk_starts_downhill_for_the_trojan_and_costs_the_clean_model(tmp_path, tiny_round, capsys):
    # eta 10, not 0.1: the clean model's cost grows as eta^2 from a float32 floor of ~1e-8, which
    # eta 0.1 does not clear (2e-5 at eta 10)
    result = _run(tmp_path, tiny_round, "--etas", "1e-4", "10", "--types", "all", "q")
    assert sorted(result["identity"]) == ["id-00000000", "id-00000001"]
    assert result["trojans"] == ["id-00000000"]  # the Trojan departs from its trigger-free answers
    assert result["identity"]["id-00000001"] == pytest.approx(0.0, abs=1e-5)  # a clean model costs nothing
    assert set(result["walks"]) == {"all", "q"} and [r["eta"] for r in result["walks"]["all"]] == [1e-4, 10]
    small, large = result["summary"]["all"]["per_eta"]
    assert small["trojan_relative_change"] < 0  # -g is a descent direction
    assert large["clean_loss"] > small["clean_loss"] > -1e-6  # any move costs the clean model, more the further
    assert result["adamw_step"]["first"] < result["adamw_step"]["later"]  # at V = 0 few parameters have a gradient
    assert "| all |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--etas", "0"], "--etas"), (["--types", "lm_head"], "--types")],
)
def test_bad_flags_are_one_clear_error(tmp_path, tiny_round, flags, message):
    with pytest.raises(SystemExit, match=message):
        bench.main(["--models_dirpath", str(tiny_round), "--scratch", str(tmp_path), *flags])


def test_a_round_with_nothing_to_remove_is_refused(tmp_path, tiny_models):
    root = tmp_path / "models"
    root.mkdir()
    (root / "clean").symlink_to(tiny_models["qwen2"])
    meta = write_meta(tmp_path / "meta.json")
    with pytest.raises(SystemExit, match="needs a change"):
        bench.main(["--models_dirpath", str(root), "--metaparameters", str(meta), "--scratch", str(tmp_path / "s")])


def test_a_test_split_model_is_refused(tmp_path, model_copy):
    root = tmp_path / "models"
    root.mkdir()
    model = model_copy("llama").rename(root / "id-00000003")
    config = json.loads((model / "round_config.json").read_text())
    (model / "round_config.json").write_text(json.dumps({**config, "farm": {"split": "test"}}))
    with pytest.raises(SystemExit, match="test-split model"):
        bench.main(["--models_dirpath", str(root), "--scratch", str(tmp_path / "s")])
