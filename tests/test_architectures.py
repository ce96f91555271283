import pytest
import torch

from telelora import modelio
from telelora.architectures import find_adapted_layers
from telelora.errors import UnsupportedArchitectureError
from telelora.metaparameters import PROJECTION_TYPES

CPU = torch.device("cpu")


def _load(path):
    return modelio.load_model(path, CPU, torch.float32)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2", "gemma3"])
def test_separate_projections_map_to_all_seven_types(tiny_models, arch):
    layers = find_adapted_layers(_load(tiny_models[arch]), PROJECTION_TYPES)
    assert len(layers) == 2 * 7
    assert {layer.projection_type for layer in layers} == set(PROJECTION_TYPES)
    assert [layer.depth for layer in layers if layer.projection_type == "q"] == [0.0, 1.0]
    assert all(".layers." in layer.name for layer in layers)


def test_phi3_fused_layers_take_one_adapter_on_their_shared_input(tiny_models):
    layers = find_adapted_layers(_load(tiny_models["phi3"]), PROJECTION_TYPES)
    by_name = {layer.name.rsplit(".", 1)[-1]: layer.projection_type for layer in layers}
    assert by_name == {"qkv_proj": "q", "o_proj": "o", "gate_up_proj": "gate", "down_proj": "down"}
    assert len(layers) == 8


def test_projection_types_filter(tiny_models):
    layers = find_adapted_layers(_load(tiny_models["llama"]), ["o", "down"])
    assert sorted({layer.projection_type for layer in layers}) == ["down", "o"]


def test_unknown_architecture_gets_a_clear_error(tiny_models):
    with pytest.raises(UnsupportedArchitectureError, match="no decoder block list"):
        find_adapted_layers(_load(tiny_models["gpt2"]), PROJECTION_TYPES)


def test_types_absent_from_the_model_get_a_clear_error(tiny_models):
    with pytest.raises(UnsupportedArchitectureError, match="none of its decoder's linear layers"):
        find_adapted_layers(_load(tiny_models["phi3"]), ["k", "v"])
