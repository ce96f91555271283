"""The training curves: their arithmetic by hand, the PNG of a run, one line for a folder without one."""

import json

import pytest

from telelora.lab import curves


def test_running_mean_and_relative_curves():
    assert curves.running_mean([1.0, 3.0, 5.0], window=2) == [1.0, 2.0, 4.0]
    monitor = {
        "identity": {"a": 2.0, "b": 4.0},
        "evaluations": [{"step": 0, "losses": {"a": 2.0, "b": 4.0}}, {"step": 5, "losses": {"a": 1.0}}],
    }
    assert curves.relative_curves(monitor) == {"a": ([0, 5], [0.0, -1.0]), "b": ([0], [0.0])}


def test_plot_writes_a_png_and_a_folder_without_a_run_is_one_line(tmp_path):
    (tmp_path / "losses.json").write_text(json.dumps([{"step": i, "loss": 1.0 / (i + 1)} for i in range(4)]))
    evaluations = [{"step": 0, "losses": {"m": 1.0}}, {"step": 4, "losses": {"m": 0.8}}]
    monitor = {"identity": {"m": 1.0}, "evaluations": evaluations}
    (tmp_path / "monitor.json").write_text(json.dumps(monitor))
    curves.main([str(tmp_path)])
    assert (tmp_path / curves.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no readable losses.json"):
        curves.main([str(tmp_path / "nothing")])


def test_plot_draws_the_validation_panel_when_the_run_validated(tmp_path):
    (tmp_path / "losses.json").write_text(json.dumps([{"step": i, "loss": 1.0} for i in range(4)]))
    figures = {"v1": {"strict_fidelity": 0.4}, "v2": {"strict_fidelity": float("nan")}}
    validation = [{"step": s, "models": figures, "mean_strict_fidelity": 0.4} for s in (0, 2, 4)]
    monitor = {
        "identity": {"m": 0.0},
        "evaluations": [{"step": 0, "losses": {"m": 0.0}}],
        "validation": validation,
        "best_step": 2,
    }
    (tmp_path / "monitor.json").write_text(json.dumps(monitor))
    path = curves.plot(tmp_path)
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[1] > 1800  # three panels, 18 inches at 110 dpi
