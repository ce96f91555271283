import pytest
import torch
from peft import PeftModel

from telelora import modelio
from telelora.adapters import Adapter, LowRankDelta, applied, export_peft
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


def _merge(layers, adapters, step_size):
    delta = LowRankDelta()
    delta.add_step(layers, adapters, step_size)
    delta.merge(layers)
    return delta


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
    _merge(layers, adapters, step_size=0.7)
    assert (model(IDS).logits - hooked).abs().max() < 1e-4


def test_merge_equals_the_multiplicative_formula(tiny_models):
    model = modelio.load_model(tiny_models["qwen2"], CPU, torch.float32)  # q/k/v carry a bias
    layers = find_adapted_layers(model, ["q"])
    layer = layers[0]
    adapters = _random_adapters(layers)
    w = layer.module.weight.detach().clone()
    a = adapters[layer.name]
    _merge(layers, adapters, step_size=0.5)
    expected = w @ (torch.eye(w.shape[1]) + 0.5 * a.v.T @ a.u)
    assert torch.allclose(layer.module.weight, expected, atol=1e-5)


def _compose(model, layers, steps, step_size):
    """K steps the way mitigate runs them: each step sees the model changed so far."""
    delta = LowRankDelta()
    for k, rank in enumerate(steps):
        with delta.applied(layers):
            model(IDS)  # (mitigate collects activations here)
        delta.add_step(layers, _random_adapters(layers, rank=rank, seed=k, scale=0.2), step_size)
    return delta


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3"])
def test_k_composed_steps_are_exact_and_export_as_one_peft_lora(tiny_models, tmp_path, arch):
    model = modelio.load_model(tiny_models[arch], CPU, torch.float32)
    layers = find_adapted_layers(model, PROJECTION_TYPES)
    w0 = {layer.name: layer.module.weight.detach().clone() for layer in layers}
    delta = _compose(model, layers, steps=[3, 3, 3], step_size=0.4)
    # one layer gets a fourth, lower-rank step: exported rank is padded, result unchanged
    delta.add_step(layers[:1], _random_adapters(layers[:1], rank=2, seed=9), 0.4)
    with delta.applied(layers):
        hooked_logits = model(IDS).logits
    delta.merge(layers)
    merged_logits = model(IDS).logits
    assert (hooked_logits - merged_logits).abs().max() < 1e-4

    # W_K = W_0 (I + s V_1^T U_1) ... (I + s V_K^T U_K), factor by factor
    layer = layers[0]
    expected = w0[layer.name]
    for k, rank in enumerate([3, 3, 3]):
        a = _random_adapters(layers, rank=rank, seed=k, scale=0.2)[layer.name]
        expected = expected @ (torch.eye(expected.shape[1]) + 0.4 * a.v.T @ a.u)
    a = _random_adapters(layers[:1], rank=2, seed=9)[layer.name]
    expected = expected @ (torch.eye(expected.shape[1]) + 0.4 * a.v.T @ a.u)
    assert torch.allclose(layer.module.weight, expected, atol=1e-4)

    export_peft(delta, tmp_path / "peft", base_model_name=str(tiny_models[arch]))
    base = modelio.load_model(tiny_models[arch], CPU, torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    assert (peft_model(IDS).logits - merged_logits).abs().max() < 1e-4
    assert peft_model.peft_config["default"].r == 3 * 3 + 2


def test_bf16_model_rounds_the_composed_change_once(tiny_models):
    """K small steps on a bf16 model equal one rounding of the float32 composition."""
    model = modelio.load_model(tiny_models["llama"], CPU, torch.bfloat16)
    layers = find_adapted_layers(model, ["down"])
    w0 = {layer.name: layer.module.weight.detach().float().clone() for layer in layers}
    steps = [4] * 5
    delta = _compose(model, layers, steps=steps, step_size=0.02)
    delta.merge(layers)
    for layer in layers:
        reference = w0[layer.name]
        for k, rank in enumerate(steps):
            a = _random_adapters(layers, rank=rank, seed=k, scale=0.2)[layer.name]
            reference = reference @ (torch.eye(reference.shape[1]) + 0.02 * a.v.T @ a.u)
        ulp = reference.abs() * 2.0**-7
        assert ((layer.module.weight.float() - reference).abs() <= ulp + 1e-6).all()
        change = (layer.module.weight.float() - w0[layer.name]).norm() / (reference - w0[layer.name]).norm()
        assert 0.8 < change < 1.2


def test_export_of_nothing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="nothing to export"):
        export_peft(LowRankDelta(), tmp_path / "peft")


def test_non_finite_adapter_is_detected():
    assert not Adapter(torch.tensor([[float("nan")]]), torch.zeros(1, 1)).is_finite()
    assert Adapter(torch.zeros(1, 1), torch.zeros(1, 1)).is_finite()
