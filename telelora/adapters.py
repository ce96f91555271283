"""Multiplicative LoRA: apply by hooks, merge into weights, export as a standard PEFT LoRA.

For ``y = W x + b`` an adapter ``(U, V)``, both r x in_features, gives

    y = W (I + s V^T U) x + b = W (x + s V^T (U x)) + b

with step size ``s``. It acts on the layer's *input*, so a hook rewrites ``x`` and ``W`` is
never copied (that is how meta-training runs it). Merged, ``W' = W + s (W V^T) U``: an
additive LoRA with ``A = U`` and ``B = s W V^T`` at scaling 1, which is how it is exported to
PEFT. K composed steps ``W_k = W_{k-1} (I + s V_k^T U_k)`` are one LoRA of rank K r:
``A = [U_1; ...; U_K]``, ``B = [s W_0 V_1^T, ..., s W_{K-1} V_K^T]`` (see :class:`LowRankDelta`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from telelora.architectures import AdaptedLayer
from telelora.io_utils import staged_dir


@dataclasses.dataclass
class Adapter:
    """``U, V`` (r x in_features) for one layer."""

    u: torch.Tensor
    v: torch.Tensor

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.u).all() and torch.isfinite(self.v).all())


@contextlib.contextmanager
def applied(layers: list[AdaptedLayer], adapters: dict[str, Adapter], step_size: float = 1.0) -> Iterator[None]:
    """Run the model with ``x -> x + s V^T (U x)`` before each adapted layer, then restore it."""

    def make_hook(adapter: Adapter):
        def hook(module, args):
            x = args[0]
            u, v = adapter.u.to(x.dtype), adapter.v.to(x.dtype)
            return (x + step_size * ((x @ u.T) @ v),) + tuple(args[1:])

        return hook

    handles = [
        layer.module.register_forward_pre_hook(make_hook(adapters[layer.name]))
        for layer in layers
        if layer.name in adapters
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class LowRankDelta:
    """The accumulated change of every layer, ``W = W0 + B A``, kept in float32.

    Composing K multiplicative steps only needs ``W0`` and the factors so far:
    ``B_k = s W_{k-1} V_k^T = s (W0 V_k^T + B (A V_k^T))``. The weights themselves are written
    once, by :meth:`merge`, so a bf16 model rounds the change once rather than K times.
    """

    def __init__(self) -> None:
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (A: R x in, B: out x R)

    def __len__(self) -> int:
        return len(self.factors)

    @torch.no_grad()
    def add_step(self, layers: list[AdaptedLayer], adapters: dict[str, Adapter], step_size: float) -> None:
        """Compose ``W <- W (I + s V^T U)`` onto the current change of each adapted layer."""
        for layer in layers:
            adapter = adapters.get(layer.name)
            if adapter is None:
                continue
            weight = layer.module.weight
            u = adapter.u.to(device=weight.device, dtype=torch.float32)
            v = adapter.v.to(device=weight.device, dtype=torch.float32)
            b = weight.float() @ v.T
            if layer.name in self.factors:
                a_prev, b_prev = self.factors[layer.name]
                b = b + b_prev @ (a_prev @ v.T)
                self.factors[layer.name] = (torch.cat([a_prev, u]), torch.cat([b_prev, step_size * b], dim=1))
            else:
                self.factors[layer.name] = (u, step_size * b)

    @torch.no_grad()
    def scale(self, factor: float) -> None:
        """Shrink the whole change to ``factor`` of itself: ``W = W0 + factor B A``."""
        self.factors = {name: (a, factor * b) for name, (a, b) in self.factors.items()}

    @contextlib.contextmanager
    def applied(self, layers: list[AdaptedLayer], factor: float = 1.0) -> Iterator[None]:
        """Run the model as if merged (``y += factor B (A x)``) without touching its weights."""

        def make_hook(a: torch.Tensor, b: torch.Tensor):
            def hook(module, args, output):
                x = args[0]
                return output + (factor * ((x.float() @ a.T) @ b.T)).to(output.dtype)

            return hook

        handles = [
            layer.module.register_forward_hook(make_hook(*self.factors[layer.name]))
            for layer in layers
            if layer.name in self.factors
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def merge(self, layers: list[AdaptedLayer]) -> None:
        """Write ``W0 + B A`` (computed in float32) into the weights, once."""
        for layer in layers:
            if layer.name in self.factors:
                a, b = self.factors[layer.name]
                weight = layer.module.weight
                weight.copy_((weight.float() + b @ a).to(weight.dtype))

    def stacked(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, ``A`` (R x in) and ``B`` (out x R) on the CPU, for export."""
        return {name: (a.detach().cpu(), b.detach().cpu()) for name, (a, b) in self.factors.items()}


def export_peft(delta: LowRankDelta, out_dir: str | Path, base_model_name: str | None = None) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` that PEFT loads as a LoRA.

    All layers get the same rank (the largest; shorter factors are zero-padded) so the config
    stays a plain ``r``/``lora_alpha`` pair with scaling ``lora_alpha / r = 1``.
    """
    stacked = delta.stacked()
    if not stacked:
        raise ValueError("no adapters were merged, so there is nothing to export")
    rank = max(a.shape[0] for a, _ in stacked.values())
    tensors = {}
    for name, (a, b) in stacked.items():
        pad = rank - a.shape[0]
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=sorted(stacked),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name,
        inference_mode=True,
    )
    with staged_dir(out_dir) as staging:
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(staging))
    return Path(out_dir)
