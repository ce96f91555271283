"""TeleLoRA generators: activations of one linear layer -> a multiplicative LoRA adapter.

One :class:`AdapterGenerator` per projection type (q, k, v, o, gate, up, down) is shared by
every layer of every LLM. It reads ``X`` (N reference samples x H input neurons), and its
EinNet backbone emits two N x H maps ``U0, V0``; the ``r`` rows with the largest
``|U0_i| |V0_i|`` (the strongest rank-one terms of ``V0^T U0``) become ``U, V`` (r x H).

Symmetry, by construction: permuting the N samples permutes the rows of ``U0, V0`` and so
selects the same rows (adapter ``V^T U`` unchanged); permuting the H neurons permutes the
columns of ``U`` and ``V`` alike. Choosing the rows by strength instead of at random keeps
the adapter an exact function of the *set* of samples, in training and at mitigation.
"""

from __future__ import annotations

import torch
from torch import nn

from telelora.einnet import EinNet
from telelora.metaparameters import PROJECTION_TYPES, Metaparameters


def strongest_rows(u_norms: torch.Tensor, v_norms: torch.Tensor, rank: int) -> torch.Tensor:
    """Indices of the ``rank`` rows with the largest ``|U0_i| |V0_i|``, exact ties broken by
    ``|U0_i|``. Ties are the rule, not the exception, at initialisation (V0 = 0 makes every
    strength 0): ``topk`` would then pick rows by an order that varies with the thread
    count, and two processes would train different generators from the same data."""
    by_u = u_norms.argsort(descending=True, stable=True)
    by_strength = (u_norms * v_norms)[by_u].argsort(descending=True, stable=True)
    return by_u[by_strength[:rank]]


def rms_normalised(x: torch.Tensor) -> torch.Tensor:
    """``x`` scaled to unit root-mean-square (all zeros stay zeros)."""
    return x / x.pow(2).mean().sqrt().clamp_min(1e-12)


# The graph one generator pass may keep whole under autograd. At the shipped size the q..up
# layers of SmolLM2 and Gemma-3 (~120 MB) keep it and their down layers recompute; at the
# paper's size (12 stacks, N = 50) every layer of a real LLM recomputes.
GRAPH_BUDGET_BYTES = 256 * 2**20


class AdapterGenerator(nn.Module):
    """``X (N x H) -> U, V (r x H)`` for one projection type, any width H."""

    def __init__(self, hidden: int, stacks: int, use_depth_channel: bool):
        super().__init__()
        self.use_depth_channel = use_depth_channel
        self.net = EinNet(in_channels=1 + int(use_depth_channel), hidden=hidden, out_channels=2, stacks=stacks)
        self.start_at_identity()

    def start_at_identity(self) -> None:
        """Zero the V channel: the first adapters are exactly the identity (V^T U = 0), and
        gradients still reach V (dL/dV = U-weighted), as with a zero-initialised LoRA B."""
        with torch.no_grad():
            self.net.output_layer.fan_out.weight[1].zero_()
            self.net.output_layer.fan_out.bias[1].zero_()

    def forward(self, activations: torch.Tensor, depth: float, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = activations.to(self.net.input_layer.fan_in.weight.dtype)  # float32 unless the caller casts
        n, h = x.shape
        if rank > n:
            raise ValueError(f"rank {rank} exceeds the number of reference samples {n}")
        # a multiplicative adapter is scale-free in x, so only the shape of X matters
        x = rms_normalised(x)
        channels = [x]
        if self.use_depth_channel:
            channels.append(torch.full_like(x, float(depth)))
        return self.adapter_from(torch.stack(channels), rank)

    def adapter_from(self, channels: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``U, V`` from the network's input channels (C x N x H): the ``rank`` strongest rows."""
        u0, v0 = self.net(channels)
        rows = strongest_rows(u0.norm(dim=-1), v0.norm(dim=-1), rank)
        # rows of norm ~ 1/sqrt(r): the sum of r rank-one terms V^T U stays O(1) for every
        # width and rank, so a small step of the generator is a small change of the LLM
        scale = (channels.shape[-1] * rank) ** -0.5
        return u0[rows] * scale, v0[rows] * scale


class GeneratorBank(nn.Module):
    """The set of generators, one per projection type, with the config that built them."""

    def __init__(self, hidden: int, stacks: int, use_depth_channel: bool, projection_types=PROJECTION_TYPES):
        super().__init__()
        self.config = {
            "generator_hidden": hidden,
            "generator_stacks": stacks,
            "use_depth_channel": use_depth_channel,
            "projection_types": list(projection_types),
        }
        self.generators = nn.ModuleDict(
            {t: AdapterGenerator(hidden, stacks, use_depth_channel) for t in projection_types}
        )

    @classmethod
    def from_metaparameters(cls, meta: Metaparameters) -> GeneratorBank:
        return cls(meta.generator_hidden, meta.generator_stacks, meta.use_depth_channel)

    def set_graph_budget(self, graph_bytes: int | None = GRAPH_BUDGET_BYTES) -> None:
        """Bound the autograd graph of one generator pass (meta-training's phase 3): a layer
        whose graph would exceed ``graph_bytes`` recomputes its EinNet blocks in backward."""
        for generator in self.generators.values():
            generator.net.set_graph_budget(graph_bytes)

    def forward(self, projection_type: str, activations: torch.Tensor, depth: float, rank: int):
        return self.generators[projection_type](activations, depth, rank)
