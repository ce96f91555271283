"""The gate-readings bench: the merge planned as mitigate plans it, the reading with and without
the drift guard, resume, and one clear error for a bad pair."""

import json

import pytest

from bench import gate_readings as bench
from tests.conftest import write_meta

W = 0.02  # a merge small enough that the tiny models keep most of their answers (the guard at 0.01 never binds)


def test_a_bad_pair_is_one_clear_error():
    with pytest.raises(bench.TeleLoRAError, match="expected MODEL_DIR:ROUND_DIR"):
        bench.parse_pair("just-a-folder")
    with pytest.raises(SystemExit, match="^error: .*expected MODEL_DIR:ROUND_DIR"):
        bench.main(["--pairs", "just-a-folder", "--out", "unused.json"])


def test_a_missing_model_folder_is_one_line_and_keeps_what_was_read(tmp_path, poisoned_round, learned_dir):
    meta = write_meta(tmp_path / "meta.json", reference_kinds=["clean"], reference_weight=W)
    out = tmp_path / "readings.json"
    good = f"{poisoned_round / 'models' / 'id-1'}:{poisoned_round}"
    with pytest.raises(SystemExit, match="^error: "):
        bench.main(["--pairs", good, f"{tmp_path / 'missing'}:{poisoned_round}", "--metaparameters", str(meta),
                    "--learned_parameters", str(learned_dir), "--out", str(out)])  # fmt: skip
    assert [r["route"] for r in json.loads(out.read_text())["rows"]] == ["reference_merge"]


@pytest.mark.parametrize("guard_bound", [0.0, 0.01])
def test_the_reading_is_the_guards_or_measured_alike(tmp_path, poisoned_round, learned_dir, guard_bound):
    meta = write_meta(tmp_path / "meta.json", reference_kinds=["clean"], merge_min_agreement=guard_bound,
                      reference_weight=W, repair_prompts=8, repair_max_agreement=0.9)  # fmt: skip
    out = tmp_path / "readings.json"
    pair = f"{poisoned_round / 'models' / 'id-1'}:{poisoned_round}"
    argv = ["--pairs", pair, "--metaparameters", str(meta), "--learned_parameters", str(learned_dir), "--out", str(out)]
    bench.main(argv)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["route"] == "reference_merge" and row["references"] == ["clean id-2"] and row["weights"] == [W]
    assert 0.0 < row["reading"] <= 1.0 and row["repair"] == (row["reading"] <= 0.9)
    assert row["guard"]["applied"] == (guard_bound > 0)
    bench.main(argv)  # resumed: nothing read twice
    assert json.loads(out.read_text())["rows"] == [row]


def test_the_two_readings_agree(tmp_path, poisoned_round, learned_dir):
    """Measured by the gate itself (guard off) and by the guard (on, never binding): one figure."""
    readings = []
    for bound in (0.0, 0.01):
        meta = write_meta(tmp_path / f"meta{bound}.json", reference_kinds=["clean"], merge_min_agreement=bound,
                          reference_weight=W)  # fmt: skip
        out = tmp_path / f"readings{bound}.json"
        bench.main(["--pairs", f"{poisoned_round / 'models' / 'id-1'}:{poisoned_round}", "--metaparameters",
                    str(meta), "--learned_parameters", str(learned_dir), "--out", str(out)])  # fmt: skip
        row = json.loads(out.read_text())["rows"][0]
        assert row["weights"] == [W]  # the guard never binds: both read the same merge
        readings.append(row["reading"])
    assert readings[0] is not None and readings[0] == pytest.approx(readings[1], abs=1e-6)
