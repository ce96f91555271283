"""The delta-subspace bench: its shares on matrices with a known answer, and a tiny model end to end."""

import math

import pytest
import torch

from bench import delta_subspace as bench
from telelora import modelio


def _sigma(width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A second moment with distinct eigenvalues, and its eigenvectors (quietest first)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))[0]
    values = torch.linspace(0.1, 10.0, width, dtype=torch.float64)
    return basis @ torch.diag(values) @ basis.T, basis


def test_a_delta_reading_only_loud_directions_is_all_loud_and_none_quiet():
    width, k = 24, 4
    sigma, basis = _sigma(width)
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(16, width, generator=g, dtype=torch.float64)
    delta = torch.randn(16, k, generator=g, dtype=torch.float64) @ basis[:, -k:].T  # reads the k loudest
    row = bench.layer_shares(weight, delta, sigma, [k])
    assert row[f"loud{k}"] == pytest.approx(1.0) and row[f"quiet{k}"] == pytest.approx(0.0, abs=1e-12)
    assert row[f"random{k}"] == k / width
    assert row["traffic_delta"] > 1  # the loud directions carry more than an average one
    for key, value in row.items():
        if key != "width":
            assert math.isfinite(value) and value >= 0
        if key.startswith(("gain_quiet", "w_svd", "quiet", "loud", "out_")):
            assert value <= 1 + 1e-9


def test_traffic_is_one_for_an_isotropic_change_and_ranks_directions():
    sigma, basis = _sigma(12)
    assert bench.traffic(torch.eye(12, dtype=torch.float64), sigma) == pytest.approx(1.0)
    loud = bench.traffic(basis[:, -1:].T, sigma)
    quiet = bench.traffic(basis[:, :1].T, sigma)
    assert quiet < 1 < loud


def test_a_delta_in_the_weights_top_singular_directions_is_found_by_w_svd():
    g = torch.Generator().manual_seed(2)
    u = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))[0]
    singular = torch.linspace(10, 1, 10, dtype=torch.float64)
    weight = u @ torch.diag(singular) @ v[:, :10].T
    delta = u[:, :2] @ v[:, :2].T  # the weight's own top two directions, both sides
    row = bench.layer_shares(weight, delta, _sigma(20)[0], [2])
    assert row["w_svd2"] == pytest.approx(1.0) and row["out_svd2"] == pytest.approx(1.0)


def test_spike_compares_the_change_with_the_weights_spectrum():
    g = torch.Generator().manual_seed(4)
    u = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))[0]
    # singular values 10 .. 1: torch's median is 5, the lower middle one
    weight = u @ torch.diag(torch.linspace(10, 1, 10, dtype=torch.float64)) @ v[:, :10].T
    for size, spike in ((0.5, 0.1), (20.0, 4.0)):
        delta = size * torch.outer(u[:, 0], v[:, 3])
        row = bench.layer_shares(weight, delta, _sigma(20)[0], [2])
        assert row["spike"] == pytest.approx(spike) and row["spike_top"] == pytest.approx(size / 10)


def test_measure_on_a_tiny_model_gives_a_row_per_changed_layer(tiny_models):
    folder = tiny_models["llama"]
    model = modelio.load_model(folder, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(3)
    names = [n for n, p in model.named_parameters() if n.endswith(("q_proj.weight", "down_proj.weight"))]
    shapes = {n: dict(model.named_parameters())[n].shape for n in names}
    factors = {n: (torch.randn(2, shapes[n][1], generator=g), torch.randn(shapes[n][0], 2, generator=g)) for n in names}
    rows = bench.measure(folder, factors, ["What is the capital of France?", "Name a prime number."], [2])
    assert [r["layer"] for r in rows] == names
    table = bench.summary({"tiny": rows})
    assert set(table) >= {"traffic_delta", "gain_quiet2", "random2"}
    assert all(math.isfinite(s["median"]) for s in table.values())


def test_a_missing_farm_or_bad_sizes_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="error: "):
        bench.main(["--farm", str(tmp_path), "--models", "id-00000000"])
    with pytest.raises(SystemExit, match="at least 1"):
        bench.main(["--farm", str(tmp_path), "--models", "id-00000000", "--ks", "0"])
