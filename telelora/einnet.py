"""The permutation-symmetric backbone: an EinNet for the ``ab`` symmetry type.

The input is a matrix-shaped set of features ``x[..., c, a, b]`` where ``a`` (N samples) and
``b`` (H neurons) are two *independent* permutation axes and ``c`` is an ordinary channel
axis. Channels come first so that every operation below reads contiguous (a, b) planes: the
channel maps are one matrix product over a flattened plane and the pooling contractions are
batched matrix products, with no layout copies (channel-last spent ~30 % of its CPU time on
them). Every layer is equivariant to permuting ``a`` and ``b`` separately, so a stack of them
is too (appendix B of the TeleLoRA paper). A layer is

    fan-in linear on c  ->  einsum pooling over (a, b)  ->  fan-out linear on c

and the pooling has five branches, each fed by its own slice of the fan-in channels:

* identity                                  ``y[a,b] = x[a,b]``
* mean over neurons (row mean)              ``y[a,b] = mean_b' x[a,b']``
* mean over samples (column mean)           ``y[a,b] = mean_a' x[a',b]``
* elementwise product                       ``y[a,b] = z[a,b] * x[a,b]``
* one order-3 contraction                   ``y[a,b] = mean_{a',b'} z[a',b'] z'[a,b'] x[a',b]``

``z`` marks a standardised input (zero mean, unit variance over the whole a-by-b slice).
Using means rather than sums and standardising the multiplied operands keeps every branch
O(1) whatever N and H are, which is what lets one network serve layers of width 8 and
14336 alike. The linear layers act on channels only and so never see N or H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

_BRANCH_INPUTS = 8  # channel slices the pooling consumes: 1 + 1 + 1 + 2 + 3
_BRANCH_OUTPUTS = 5
# Tensors autograd saves per entry of a block's input, per stack, when nothing is recomputed
# (measured with saved_tensors_hooks: 24-27 at 4 to 12 stacks).
_GRAPH_FLOATS_PER_INPUT_ELEMENT = 27


def _standardise(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance over the (a, b) plane of every channel.

    Written out rather than with ``Tensor.std``, which is several times slower on CPU."""
    centred = x - x.mean(dim=(-2, -1), keepdim=True)
    std = centred.square().mean(dim=(-2, -1), keepdim=True).sqrt()
    return centred / (std + eps)


def _on_channels(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear`` applied to the channel axis of ``x[..., c, a, b]``: one matrix product."""
    flat = x.flatten(-2)
    bias = linear.bias.unsqueeze(-1)
    if flat.dim() == 2:  # the generator's case: the bias add fused into the product
        out = torch.addmm(bias, linear.weight, flat)
    else:
        out = torch.matmul(linear.weight, flat) + bias
    return out.unflatten(-1, x.shape[-2:])


class EinsumPoolAB(nn.Module):
    """Equivariant pooling for the ``ab`` type; input channels ``8*w`` -> output ``5*w``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = x.chunk(_BRANCH_INPUTS, dim=-3)
        n, h = x.shape[-2], x.shape[-1]
        identity = chunks[0]
        row_mean = chunks[1].mean(dim=-1, keepdim=True).expand_as(chunks[1])
        col_mean = chunks[2].mean(dim=-2, keepdim=True).expand_as(chunks[2])
        product = _standardise(chunks[3]) * chunks[4]
        # order 3, contracted pairwise so the largest intermediate is N x N per channel:
        # gram[i, j] = mean_b z5[i, b] z6[j, b];  y[a, b] = mean_i gram[i, a] x7[i, b]
        gram = _standardise(chunks[5]) @ _standardise(chunks[6]).transpose(-1, -2) / h
        order3 = gram.transpose(-1, -2) @ chunks[7] / n
        return torch.cat((identity, row_mean, col_mean, product, order3), dim=-3)


class EinLayer(nn.Module):
    """Fan-in linear, einsum pooling, fan-out linear (all linear maps act on channels)."""

    def __init__(self, in_channels: int, pool_width: int, out_channels: int):
        super().__init__()
        self.fan_in = nn.Linear(in_channels, pool_width * _BRANCH_INPUTS)
        self.pool = EinsumPoolAB()
        self.fan_out = nn.Linear(pool_width * _BRANCH_OUTPUTS, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _on_channels(self.fan_out, self.pool(_on_channels(self.fan_in, x)))


class EinNet(nn.Module):
    """Stacked equivariant layers with GELU and pre-normalised residual connections.

    ``x[..., in_channels, N, H] -> y[..., out_channels, N, H]``, equivariant to permutations
    of N and of H. Each block reads its input standardised over (N, H) per channel (an
    equivariant LayerNorm): without it the residual stream grows ~3x per block, so a
    12-stack network amplifies its input ~1e7-fold and the first optimiser step explodes.
    """

    def __init__(self, in_channels: int, hidden: int, out_channels: int, stacks: int):
        super().__init__()
        self.input_layer = EinLayer(in_channels, hidden, hidden)
        self.blocks = nn.ModuleList(EinLayer(hidden, hidden, hidden) for _ in range(stacks - 1))
        self.output_layer = EinLayer(hidden, hidden, out_channels)
        self.checkpoint_min_elements: int | None = None  # see set_graph_budget

    def set_graph_budget(self, graph_bytes: int | None) -> None:
        """Under autograd, recompute blocks in backward when the whole graph would exceed
        ``graph_bytes`` (0: always; None: never). A recomputed block keeps only its input:
        for a 14336-wide layer its intermediates are ~1 GB, its input 46 MB. A graph within
        the budget is kept whole, which saves the ~25 % of a forward+backward that
        recomputing costs."""
        if graph_bytes is None:
            self.checkpoint_min_elements = None
            return
        per_element = (
            _GRAPH_FLOATS_PER_INPUT_ELEMENT * (len(self.blocks) + 1) * self.output_layer.fan_in.weight.element_size()
        )
        self.checkpoint_min_elements = graph_bytes // per_element

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layer(x)
        for block in self.blocks:
            h = h + self._run(block, h)
        return self._run(self.output_layer, h)

    def _run(self, layer: EinLayer, h: torch.Tensor) -> torch.Tensor:
        limit = self.checkpoint_min_elements
        if limit is not None and h.numel() >= limit and torch.is_grad_enabled():
            return checkpoint(_pre_activated, layer, h, use_reentrant=False)
        return _pre_activated(layer, h)


def _pre_activated(layer: EinLayer, h: torch.Tensor) -> torch.Tensor:
    return layer(F.gelu(_standardise(h)))
