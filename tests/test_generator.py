import pytest
import torch

from telelora.generator import AdapterGenerator, GeneratorBank
from telelora.metaparameters import PROJECTION_TYPES


def _random_generator(seed=0, depth_channel=True):
    torch.manual_seed(seed)
    gen = AdapterGenerator(hidden=8, stacks=3, use_depth_channel=depth_channel).double()
    with torch.no_grad():
        gen.net.output_layer.fan_out.weight.normal_(0, 0.5)
    return gen


def _adapter_matrix(u, v):
    return v.T @ u


def test_permuting_samples_leaves_the_adapter_unchanged():
    gen = _random_generator()
    x = torch.randn(20, 16, dtype=torch.double)
    u, v = gen(x, depth=0.3, rank=5)
    perm = torch.randperm(20)
    u2, v2 = gen(x[perm], depth=0.3, rank=5)
    assert torch.allclose(_adapter_matrix(u, v), _adapter_matrix(u2, v2), atol=1e-10)


def test_permuting_neurons_permutes_u_and_v_columns():
    gen = _random_generator(1)
    x = torch.randn(20, 16, dtype=torch.double)
    u, v = gen(x, depth=0.5, rank=4)
    perm = torch.randperm(16)
    u2, v2 = gen(x[:, perm], depth=0.5, rank=4)
    # rows may come out in another order (same set); compare the adapters, permuted
    assert torch.allclose(_adapter_matrix(u2, v2), _adapter_matrix(u, v)[perm][:, perm], atol=1e-10)
    assert torch.allclose(u2.abs().sum(0), u.abs().sum(0)[perm], atol=1e-10)


def test_adapter_depends_on_depth_only_with_the_depth_channel():
    x = torch.randn(10, 8, dtype=torch.double)
    with_depth = _random_generator(2, depth_channel=True)
    a0, a1 = (_adapter_matrix(*with_depth(x, d, 3)) for d in (0.0, 1.0))
    assert not torch.allclose(a0, a1)
    without = _random_generator(2, depth_channel=False)
    b0, b1 = (_adapter_matrix(*without(x, d, 3)) for d in (0.0, 1.0))
    assert torch.allclose(b0, b1)


def test_fresh_generator_is_the_identity_and_still_learns():
    gen = AdapterGenerator(hidden=8, stacks=2, use_depth_channel=True)
    x = torch.randn(12, 10)
    u, v = gen(x, depth=0.0, rank=4)
    assert torch.count_nonzero(v) == 0  # V^T U = 0: the model is unchanged
    target = torch.randn(10, 10)
    ((v.T @ u) * target).sum().backward()
    assert gen.net.output_layer.fan_out.weight.grad[1].abs().sum() > 0


@pytest.mark.parametrize("h", [8, 896, 4096, 14336])
def test_any_width_and_scale_free_input(h):
    gen = _random_generator(3).float()
    x = torch.randn(50, h)
    with torch.no_grad():
        u, v = gen(x, depth=1.0, rank=20)
        u2, v2 = gen(x * 1000.0, depth=1.0, rank=20)
    assert u.shape == v.shape == (20, h)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    # float32 rounding only, relative to the largest entry: at width 14336 entries reach ~80, and
    # single-threaded BLAS sums in another order than two threads do (1.6e-4 apart, max 83)
    for a, b in ((u, u2), (v, v2)):
        assert (a - b).abs().max() <= 1e-4 + 1e-5 * a.abs().max()
    # unit-sized rows: the adapter stays O(1) whatever the width
    assert 1e-3 < v.norm(dim=1).max() < 1e3


def test_rank_larger_than_samples_is_rejected():
    with pytest.raises(ValueError, match="rank 9 exceeds"):
        _random_generator()(torch.randn(8, 4, dtype=torch.double), 0.0, 9)


def test_bank_has_one_generator_per_projection_type():
    bank = GeneratorBank(hidden=4, stacks=1, use_depth_channel=False)
    assert sorted(bank.generators) == sorted(PROJECTION_TYPES)
    u, v = bank("down", torch.randn(6, 5), 0.5, 2)
    assert u.shape == (2, 5)


def test_strongest_rows_break_exact_ties_by_u_norm():
    from telelora.generator import strongest_rows

    u = torch.tensor([0.5, 3.0, 1.0, 2.0])
    # V0 = 0, as at initialisation: every strength ties at 0, the largest |U0| rows win
    assert strongest_rows(u, torch.zeros(4), 2).tolist() == [1, 3]
    assert strongest_rows(u, torch.tensor([1.0, 0.1, 1.0, 0.0]), 2).tolist() == [2, 0]
    perm = torch.tensor([2, 0, 3, 1])
    assert sorted(perm[strongest_rows(u[perm], torch.zeros(4), 2)].tolist()) == [1, 3]
