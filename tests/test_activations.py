import pytest
import torch

from telelora import activations, modelio
from telelora.architectures import find_adapted_layers
from telelora.chat import prompt_ids

CPU = torch.device("cpu")
TEXTS = ["What is the capital of France?", "Explain photosynthesis briefly.", "Why?", "Name three prime numbers."]


@pytest.fixture(scope="module")
def llama(tiny_models):
    model = modelio.load_model(tiny_models["llama"], CPU, torch.float32)
    return model, modelio.load_tokenizer(tiny_models["llama"]), find_adapted_layers(model, ["q", "down"])


def _inputs_of(model, layer, ids):
    seen = []
    handle = layer.module.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].detach()))
    model(torch.tensor([ids]))
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("mode", ["mean", "last", "random"])
def test_rows_match_unbatched_inputs(llama, mode):
    model, tok, layers = llama
    acts = activations.collect(model, tok, layers, TEXTS, mode, batch_size=3, max_tokens=64, seed=5)
    again = activations.collect(model, tok, layers, TEXTS, mode, batch_size=1, max_tokens=64, seed=5)
    for layer in layers:
        assert acts[layer.name].shape == (len(TEXTS), layer.in_features)
        assert torch.allclose(acts[layer.name], again[layer.name], atol=1e-5)  # padding does not leak in
    layer = layers[0]
    for row, text in enumerate(TEXTS):
        x = _inputs_of(model, layer, prompt_ids(tok, text))
        if mode == "mean":
            assert torch.allclose(acts[layer.name][row], x.mean(0), atol=1e-5)
        elif mode == "last":
            assert torch.allclose(acts[layer.name][row], x[-1], atol=1e-5)
        else:
            assert any(torch.allclose(acts[layer.name][row], x[t], atol=1e-5) for t in range(x.shape[0]))


def test_random_positions_are_seeded(llama):
    model, tok, layers = llama
    a = activations.collect(model, tok, layers, TEXTS, "random", seed=1)
    b = activations.collect(model, tok, layers, TEXTS, "random", seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_token_mode_is_rejected(llama):
    model, tok, layers = llama
    with pytest.raises(ValueError, match="activation_tokens"):
        activations.collect(model, tok, layers, TEXTS, "first")
