import pytest
import torch

from telelora.einnet import EinNet, EinsumPoolAB

torch.manual_seed(0)


def _net(in_ch=2, out_ch=3, stacks=3, hidden=6):
    return EinNet(in_ch, hidden, out_ch, stacks).double()


@pytest.mark.parametrize("n,h", [(5, 7), (12, 3), (50, 64)])
def test_equivariant_to_sample_and_neuron_permutations(n, h):
    net = _net()
    x = torch.randn(2, n, h, dtype=torch.double)
    rows, cols = torch.randperm(n), torch.randperm(h)
    y = net(x)
    assert torch.allclose(net(x[:, rows]), y[:, rows], atol=1e-10)
    assert torch.allclose(net(x[..., cols]), y[..., cols], atol=1e-10)
    assert torch.allclose(net(x[:, rows][..., cols]), y[:, rows][..., cols], atol=1e-10)


def test_not_equivariant_to_transposition_of_the_two_axes():
    """a and b are independent axes: the network is not a symmetric-matrix (aa-type) model."""
    net = _net(in_ch=1, out_ch=1)
    x = torch.randn(1, 6, 6, dtype=torch.double)
    assert not torch.allclose(net(x.transpose(1, 2)), net(x).transpose(1, 2), atol=1e-6)


def test_pooling_branches_match_their_definitions():
    x = torch.randn(8, 4, 5, dtype=torch.double)  # width 1 per branch
    y = EinsumPoolAB()(x)
    assert y.shape == (5, 4, 5)
    assert torch.allclose(y[0], x[0])
    assert torch.allclose(y[1], x[1].mean(dim=1, keepdim=True).expand(4, 5))
    assert torch.allclose(y[2], x[2].mean(dim=0, keepdim=True).expand(4, 5))

    def std(t):
        return (t - t.mean()) / (t.std(unbiased=False) + 1e-5)

    assert torch.allclose(y[3], std(x[3]) * x[4])
    z5, z6, x7 = std(x[5]), std(x[6]), x[7]
    expected = torch.zeros(4, 5, dtype=torch.double)
    for a in range(4):
        for b in range(5):
            expected[a, b] = sum(z5[i, c] * z6[a, c] * x7[i, b] for i in range(4) for c in range(5)) / 20
    assert torch.allclose(y[4], expected)


def test_output_scale_does_not_depend_on_width():
    """Means instead of sums: widths 1000 and 14336 give outputs of the same RMS."""
    torch.manual_seed(0)
    net = EinNet(1, 4, 2, 2)
    with torch.no_grad():
        rms = {h: net(torch.randn(1, 50, h)).pow(2).mean().sqrt().item() for h in (8, 1000, 14336)}
    assert all(0.01 < r < 10 for r in rms.values())
    assert 0.5 < rms[14336] / rms[1000] < 2


def test_leading_batch_dimensions_are_independent():
    net = _net()
    x = torch.randn(3, 2, 6, 7, dtype=torch.double)
    y = net(x)
    assert torch.allclose(y[1], net(x[1]), atol=1e-12)


def _saved_graph_bytes(net: EinNet, x: torch.Tensor) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    return sum(storages.values())


def test_block_checkpointing_changes_neither_output_nor_gradients():
    net = _net(stacks=4)
    x = torch.randn(2, 9, 11, dtype=torch.double)
    weights = torch.randn(3, 9, 11, dtype=torch.double)
    results = []
    for budget in (None, 0):
        net.zero_grad()
        net.set_graph_budget(budget)
        y = net(x)
        (y * weights).sum().backward()
        results.append((y.detach(), [p.grad.clone() for p in net.parameters()]))
    (y0, g0), (y1, g1) = results
    assert torch.equal(y0, y1)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(g0, g1, strict=True))


def test_the_graph_budget_decides_which_layers_recompute():
    net = _net(stacks=6)
    x = torch.randn(2, 40, 50, dtype=torch.double)
    net.set_graph_budget(None)
    whole = _saved_graph_bytes(net, x)
    net.set_graph_budget(0)
    recomputed = _saved_graph_bytes(net, x)
    assert recomputed < whole / 3
    net.set_graph_budget(2 * whole)  # the estimate is rough: a graph well within the budget is kept
    assert _saved_graph_bytes(net, x) == whole
    net.set_graph_budget(whole // 4)
    assert _saved_graph_bytes(net, x) == recomputed
