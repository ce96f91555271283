"""The layer-local bench: its residual on changes with a known answer, the weight-aware
generator's symmetries, and a tiny farm end to end."""

import json

import pytest
import torch

from bench import layer_local as bench
from telelora.generator import AdapterGenerator


def _layer(width=12, out=10, rank=2, rows=6, seed=0, changed=True):
    g = torch.Generator().manual_seed(seed)
    factors = (torch.randn(rank, width, generator=g), torch.randn(out, rank, generator=g)) if changed else None
    x = torch.randn(rows, width, generator=g)
    return bench.LayerData(
        "layers.0.mlp.up_proj", "up", 0.0, torch.randn(8, width, generator=g), torch.randn(8, width, generator=g),
        x, rows // 2, factors,
    )  # fmt: skip


def test_the_identity_leaves_all_of_the_change_and_the_exact_inverse_none():
    layer = _layer(width=10, out=10)
    g = torch.Generator().manual_seed(1)
    w_base = torch.randn(10, 10, generator=g) + 4 * torch.eye(10)
    model = bench.ModelData("id-1", "base", "train", [layer])
    weights = {layer.name: w_base}
    identity = bench.model_residual(model, weights, lambda _: None, 1.0)
    assert all(float(r) == pytest.approx(1.0) for r in identity.values())
    # s W V^T U = -dW with W = W_base + B A: V^T = -W^-1 B, U = A
    a, b = layer.factors
    u, v = a, -(torch.linalg.solve(w_base + b @ a, b)).T
    exact = bench.model_residual(model, weights, lambda _: (u, v), 1.0)
    assert all(float(r) == pytest.approx(0.0, abs=1e-8) for r in exact.values())
    half = bench.model_residual(model, weights, lambda _: (u, v / 2), 1.0)  # half undone: a quarter is left
    assert float(half["all"]) == pytest.approx(0.25, rel=1e-4)


def test_a_change_to_a_layer_the_trojan_left_alone_counts_against_it():
    changed, untouched = _layer(seed=2), _layer(seed=3, changed=False)
    untouched.name = "layers.1.mlp.up_proj"
    model = bench.ModelData("id-1", "base", "train", [changed, untouched])
    weights = {changed.name: torch.randn(10, 12), untouched.name: torch.randn(10, 12)}
    u, v = torch.randn(2, 12), torch.randn(2, 12)
    only_there = bench.model_residual(model, weights, lambda layer: (u, v) if layer is untouched else None, 1.0)
    assert float(only_there["all"]) > 1


@torch.no_grad()
def test_the_weight_aware_generator_starts_at_the_identity_and_keeps_the_symmetries():
    torch.manual_seed(0)
    gen = bench.WeightAwareGenerator(hidden=8, stacks=2, use_depth_channel=True)
    x, extra = torch.randn(6, 9), torch.randn(6, 9)
    u, v = gen.forward_with(x, extra, 0.5, 2)
    assert u.shape == v.shape == (2, 9) and float(v.abs().max()) == 0  # V = 0: the identity
    gen.net.output_layer.fan_out.weight[1].normal_()
    u, v = gen.forward_with(x, extra, 0.5, 2)
    neurons, samples = torch.randperm(9), torch.randperm(6)
    u_p, v_p = gen.forward_with(x[samples][:, neurons], extra[samples][:, neurons], 0.5, 2)
    assert torch.allclose(v_p.T @ u_p, (v.T @ u)[neurons][:, neurons], atol=1e-5)
    assert sum(p.numel() for p in gen.parameters()) > sum(
        p.numel() for p in AdapterGenerator(8, 2, True).parameters()
    )  # one more input channel


def test_free_adapters_undo_most_of_a_change_they_can_express():
    layer = _layer(width=10, out=10, rank=2, rows=40)
    model = bench.ModelData("id-1", "base", "validation", [layer])
    weights = {layer.name: torch.eye(10) * 3}
    fitted = bench.fit_free(model, weights, rank=2, step_size=1.0, steps=300, lr=5e-2)
    assert fitted["all"] < 0.05


def test_on_a_tiny_farm_it_trains_measures_and_writes_json(tiny_farm, tmp_path, meta_file):
    _, root, _ = tiny_farm
    out = tmp_path / "ll.json"
    argv = ["--farm", str(root / "out"), "--scratch", str(tmp_path / "scratch"), "--metaparameters", str(meta_file),
            "--rows", "8", "--steps", "3", "--eval_every", "2", "--free_steps", "3", "--cache_dir", str(root / "cache"),
            "--out", str(out)]  # fmt: skip
    bench.main(argv)
    payload = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert payload["train_models"] and payload["validation_models"]
    assert not set(payload["train_models"]) & set(payload["validation_models"])
    for variant in bench.VARIANTS:
        curve = payload["results"][variant]["curve"]
        assert [p["step"] for p in curve] == [0, 2, 3]
        first = curve[0]["validation"]
        assert all(r["all"] == pytest.approx(1.0) for r in first.values())  # fresh generators: the identity
    assert set(payload["results"]["free"]["validation"]) == set(payload["validation_models"])
    bench.main(argv)  # the layer data come from the scratch cache the second time
    assert len(list((tmp_path / "scratch").glob("*.pt"))) == 2


def test_bad_flags_and_a_missing_farm_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--variants"):
        bench.main(["--farm", str(tmp_path), "--scratch", str(tmp_path), "--variants", "oracle"])
    with pytest.raises(SystemExit, match="not positive"):
        bench.main(["--farm", str(tmp_path), "--scratch", str(tmp_path), "--steps", "0"])
    with pytest.raises(SystemExit, match="error: "):
        bench.main(["--farm", str(tmp_path / "none"), "--scratch", str(tmp_path)])
