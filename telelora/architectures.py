"""Map a Hugging Face causal LM's linear layers to TeleLoRA projection types.

Instead of a per-architecture table of module paths, we find the decoder's list of
transformer blocks and, inside each, the linear layers whose names are the common
projection names. That covers Llama, Mistral, Qwen2, Gemma2/3 and Phi-3 alike (and the
text tower of multimodal wrappers, without touching vision encoders). A fused layer takes
one adapter on its shared input, so it maps to the type whose input it shares.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from telelora.errors import UnsupportedArchitectureError

# module name -> projection type (fused layers map to the type of their shared input)
NAME_TO_TYPE = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "qkv_proj": "q",
    "gate_up_proj": "gate",
}


@dataclasses.dataclass(frozen=True)
class AdaptedLayer:
    """One linear layer that receives an adapter."""

    name: str  # full module path in the model, as PEFT names it
    module: nn.Linear
    projection_type: str
    layer_index: int
    depth: float  # layer_index / (num_layers - 1): 0 for the first block, 1 for the last

    @property
    def in_features(self) -> int:
        return self.module.in_features


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of the (text) decoder."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    blocks = getattr(decoder, "layers", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
        return blocks
    raise UnsupportedArchitectureError(
        f"{type(model).__name__}: no decoder block list found (expected model.get_decoder().layers); "
        "supported: Llama, Mistral, Qwen2, Gemma2, Gemma3, Phi3 and architectures with the same layout"
    )


def find_adapted_layers(model: nn.Module, projection_types: tuple[str, ...] | list[str]) -> list[AdaptedLayer]:
    """Every linear layer of the decoder blocks whose type is in ``projection_types``."""
    blocks = decoder_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    wanted = set(projection_types)
    found: list[AdaptedLayer] = []
    num_blocks = len(blocks)
    for index, block in enumerate(blocks):
        for local_name, module in block.named_modules():
            projection = NAME_TO_TYPE.get(local_name.rsplit(".", 1)[-1])
            if projection is None or projection not in wanted:
                continue
            if type(module) is not nn.Linear:
                raise UnsupportedArchitectureError(
                    f"{names[id(module)]} is a {type(module).__name__}, not a plain torch.nn.Linear "
                    "(quantised or custom layers are not supported); load the model unquantised"
                )
            found.append(
                AdaptedLayer(
                    name=names[id(module)],
                    module=module,
                    projection_type=projection,
                    layer_index=index,
                    depth=index / max(1, num_blocks - 1),
                )
            )
    if not found:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: none of its decoder's linear layers is named like "
            f"{sorted(NAME_TO_TYPE)} for the requested types {sorted(wanted)}"
        )
    return found
