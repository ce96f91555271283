"""Multiplicative LoRA: apply by hooks, merge into weights, export as a standard PEFT LoRA.

For ``y = W x + b`` an adapter ``(U, V)``, both r x in_features, gives

    y = W (I + s V^T U) x + b = W (x + s V^T (U x)) + b

with step size ``s``. It acts on the layer's *input*, so a hook rewrites ``x`` and ``W`` is
never copied. Merging gives ``W' = W + s (W V^T) U``: an additive LoRA with ``A = U`` and
``B = s W V^T`` at scaling 1, which is how it is exported to PEFT. K composed steps
``W_k = W_{k-1} (I + s V_k^T U_k)`` are one LoRA of rank K r: ``A = [U_1; ...; U_K]``,
``B = [s W_0 V_1^T, ..., s W_{K-1} V_K^T]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from telelora.architectures import AdaptedLayer
from telelora.io_utils import publish_dir, staging_dir


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


class PeftDelta:
    """Collects the additive LoRA factors of every merged step, for PEFT export."""

    def __init__(self) -> None:
        self.factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.factors.setdefault(name, []).append((a.detach().float().cpu(), b.detach().float().cpu()))

    def stacked(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, ``A`` (R x in) and ``B`` (out x R) with all steps concatenated."""
        return {
            name: (torch.cat([a for a, _ in fs], dim=0), torch.cat([b for _, b in fs], dim=1))
            for name, fs in self.factors.items()
        }


@torch.no_grad()
def merge(
    layers: list[AdaptedLayer], adapters: dict[str, Adapter], step_size: float, delta: PeftDelta | None = None
) -> None:
    """``W <- W (I + s V^T U)`` in place (computed in float32), recording the LoRA factors."""
    for layer in layers:
        adapter = adapters.get(layer.name)
        if adapter is None:
            continue
        weight = layer.module.weight
        w32 = weight.float()
        u = adapter.u.to(device=weight.device, dtype=torch.float32)
        v = adapter.v.to(device=weight.device, dtype=torch.float32)
        b = step_size * (w32 @ v.T)
        weight.copy_((w32 + b @ u).to(weight.dtype))
        if delta is not None:
            delta.add(layer.name, u, b)


def export_peft(delta: PeftDelta, out_dir: str | Path, base_model_name: str | None = None) -> Path:
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
    out = Path(out_dir)
    staging = staging_dir(out)
    try:
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(staging))
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
