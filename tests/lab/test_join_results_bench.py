"""Joining finished quality-bench runs: the methods each file gives, the paired difference, and
one clear error for each way two runs cannot share a table."""

import json

import pytest

from bench import join_results as bench


def _row(model: str, method: str, strict: float, poisoned: bool = True, fingerprint: str = "f") -> dict:
    return {"model": model, "method": method, "steps": None, "poisoned": poisoned, "base": "smollm2",
            "behaviour": "append" if poisoned else None, "fingerprint": f"{model}-{fingerprint}",
            "strict_fidelity": strict, "fidelity": strict, "asr": 0.0 if poisoned else float("nan"),
            "false_trigger_rate": 0.0, "agreement": strict, "greedy_agreement": 0.5, "mmlu": 0.25,
            "seconds": 1.0}  # fmt: skip


def _run(path, rows, samples=40):
    path.write_text(json.dumps({"settings": {"num_samples": samples}, "rows": rows}))
    return str(path)


def test_the_chosen_methods_of_each_run_join_one_table_with_a_paired_difference(tmp_path, capsys):
    clean = False
    shipped = [_row("a", "none", 0.0), _row("a", "mitigate", 0.9), _row("b", "none", 1.0, clean),
               _row("b", "mitigate", 0.8, clean)]  # fmt: skip
    baselines = [_row("a", "none", 0.0), _row("a", "crow", 0.7), _row("b", "crow", 0.75, clean),
                 _row("b", "telelora", 0.5, clean)]  # fmt: skip
    shipped, baselines = _run(tmp_path / "shipped.json", shipped), _run(tmp_path / "baselines.json", baselines)
    out = tmp_path / "joined.json"
    bench.main(["--runs", shipped, f"{baselines}:crow", "--paired", "mitigate", "crow", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert sorted((r["model"], r["method"], r["source"]) for r in payload["rows"]) == [
        ("a", "crow", "baselines.json"), ("a", "mitigate", "shipped.json"), ("a", "none", "shipped.json"),
        ("b", "crow", "baselines.json"), ("b", "mitigate", "shipped.json"), ("b", "none", "shipped.json")]  # fmt: skip
    paired = payload["summaries"]["paired"]
    assert paired["models"] == ["a", "b"] and paired["differences"] == pytest.approx([0.2, 0.05])
    assert paired["mean"] == pytest.approx(0.125) and 0.05 - 1e-9 <= paired["low"] <= paired["high"] <= 0.2 + 1e-9
    crow = next(s for s in payload["summaries"]["all"] if s["method"] == "crow")
    assert crow["models"] == 2 and crow["strict_fidelity"]["mean"] == pytest.approx(0.725)
    assert out.with_suffix(".png").is_file()
    assert "mitigate - crow, strict Fidelity, 2 models: +0.125" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ([_row("a", "mitigate", 0.5)], "a mitigate is in both"),
        ([_row("a", "crow", 0.5, fingerprint="rebuilt")], "a differs between"),
        ([_row("b", "telelora", 0.5)], "holds no rows of crow"),
    ],
)
def test_rows_that_cannot_share_a_table_are_one_clear_error(tmp_path, second, message):
    first = _run(tmp_path / "first.json", [_row("a", "mitigate", 0.9)])
    other = _run(tmp_path / "second.json", second)
    methods = "crow" if second[0]["method"] != "mitigate" else "mitigate"
    with pytest.raises(SystemExit, match=f"error: --runs: .*{message}"):
        bench.main(["--runs", first, f"{other}:{methods}", "--out", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()


def test_bad_runs_are_one_clear_error_each(tmp_path):
    good = _run(tmp_path / "good.json", [_row("a", "mitigate", 0.9)])
    other = _run(tmp_path / "other.json", [_row("b", "crow", 0.7)], samples=24)
    (tmp_path / "broken.json").write_text("{not json")
    out = ["--out", str(tmp_path / "out.json")]
    with pytest.raises(SystemExit, match="expected FILE or FILE:METHOD"):
        bench.main(["--runs", f"{good}:,", *out])
    with pytest.raises(SystemExit, match="cannot read quality-bench rows from .*broken.json"):
        bench.main(["--runs", good, str(tmp_path / "broken.json"), *out])
    with pytest.raises(SystemExit, match="cannot read quality-bench rows from .*missing.json"):
        bench.main(["--runs", str(tmp_path / "missing.json"), *out])
    with pytest.raises(SystemExit, match="different prompt counts"):
        bench.main(["--runs", good, other, *out])
    with pytest.raises(SystemExit, match="no model has rows of both mitigate and crow"):
        bench.main(["--runs", good, "--paired", "mitigate", "crow", *out])
    assert not (tmp_path / "out.json").exists()
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(SystemExit, match="error: cannot write .*file/out.json"):
        bench.main(["--runs", good, "--out", str(blocked / "out.json")])


def test_a_method_measured_at_several_k_pairs_by_its_summary_name(tmp_path):
    rows = [_row("a", "mitigate", 0.9), {**_row("a", "telelora", 0.4), "steps": 1},
            {**_row("a", "telelora", 0.2), "steps": 2}]  # fmt: skip
    paired = bench.paired_difference(rows, "mitigate", "telelora K=2")
    assert paired["differences"] == pytest.approx([0.7])
