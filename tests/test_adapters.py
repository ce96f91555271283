import pytest
import torch
from peft import PeftModel

from telelora import modelio
from telelora.adapters import Adapter, PeftDelta, applied, export_peft, merge
from telelora.architectures import find_adapted_layers
from telelora.metaparameters import PROJECTION_TYPES

CPU = torch.device("cpu")
IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])


def _random_adapters(layers, rank=3, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {
        layer.name: Adapter(
            torch.randn(rank, layer.in_features, generator=g) * scale,
            torch.randn(rank, layer.in_features, generator=g) * scale,
        )
        for layer in layers
    }


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3"])
def test_merge_is_exact_and_hooks_are_removed(tiny_models, arch):
    model = modelio.load_model(tiny_models[arch], CPU, torch.float32)
    layers = find_adapted_layers(model, PROJECTION_TYPES)
    adapters = _random_adapters(layers)
    base = model(IDS).logits
    with applied(layers, adapters, step_size=0.7):
        hooked = model(IDS).logits
    assert torch.allclose(model(IDS).logits, base)  # hooks gone after the block
    assert (hooked - base).abs().max() > 1e-2  # the adapters did something
    merge(layers, adapters, step_size=0.7)
    assert (model(IDS).logits - hooked).abs().max() < 1e-4


def test_merge_equals_the_multiplicative_formula(tiny_models):
    model = modelio.load_model(tiny_models["qwen2"], CPU, torch.float32)  # q/k/v carry a bias
    layers = find_adapted_layers(model, ["q"])
    layer = layers[0]
    adapters = _random_adapters(layers)
    w = layer.module.weight.detach().clone()
    a = adapters[layer.name]
    merge(layers, adapters, step_size=0.5)
    expected = w @ (torch.eye(w.shape[1]) + 0.5 * a.v.T @ a.u)
    assert torch.allclose(layer.module.weight, expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
def test_k_composed_steps_export_as_one_peft_lora(tiny_models, tmp_path, arch):
    model = modelio.load_model(tiny_models[arch], CPU, torch.float32)
    layers = find_adapted_layers(model, PROJECTION_TYPES)
    delta = PeftDelta()
    for step in range(3):
        merge(layers, _random_adapters(layers, seed=step), step_size=0.4, delta=delta)
    # one layer adapted in fewer steps: exported rank is padded, result unchanged
    merge(layers[:1], _random_adapters(layers[:1], rank=2, seed=9), step_size=0.4, delta=delta)
    merged_logits = model(IDS).logits
    export_peft(delta, tmp_path / "peft", base_model_name=str(tiny_models[arch]))

    base = modelio.load_model(tiny_models[arch], CPU, torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    assert (peft_model(IDS).logits - merged_logits).abs().max() < 1e-4
    assert peft_model.peft_config["default"].r == 3 * 3 + 2


def test_export_of_nothing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="nothing to export"):
        export_peft(PeftDelta(), tmp_path / "peft")


def test_non_finite_adapter_is_detected():
    assert not Adapter(torch.tensor([[float("nan")]]), torch.zeros(1, 1)).is_finite()
    assert Adapter(torch.zeros(1, 1), torch.zeros(1, 1)).is_finite()
