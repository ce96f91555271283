import pytest
import torch

from telelora import activations, modelio
from telelora.architectures import find_adapted_layers
from telelora.chat import prompt_ids, user_token_mask

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


@pytest.mark.parametrize("kind", ["llama3.1", "gemma2", "phi3.5"])
def test_user_mask_picks_exactly_the_users_text(round_like_models, kind):
    """Not BOS, not Llama-3.1's system header, not the turn markers: the user's words."""
    tok = modelio.load_tokenizer(round_like_models[kind])
    text = "  Which planet is closest to the sun?  "
    ids, mask = prompt_ids(tok, text), user_token_mask(tok, text)
    assert len(mask) == len(ids) and not all(mask)
    assert tok.decode([i for i, keep in zip(ids, mask, strict=True) if keep]).strip() == text.strip()


def test_user_mode_averages_the_user_tokens_only(round_like_models):
    folder = round_like_models["llama3.1"]
    model, tok = modelio.load_model(folder, CPU, torch.float32), modelio.load_tokenizer(folder)
    layers = find_adapted_layers(model, ["q", "down"])
    acts = activations.collect(model, tok, layers, TEXTS, "user", batch_size=3, max_tokens=256)
    whole = activations.collect(model, tok, layers, TEXTS, "mean", batch_size=3, max_tokens=256)
    layer = layers[-1]
    for row, text in enumerate(TEXTS):
        x = _inputs_of(model, layer, prompt_ids(tok, text))
        keep = torch.tensor(user_token_mask(tok, text))
        assert torch.allclose(acts[layer.name][row], x[keep].mean(0), atol=1e-4)
        assert not torch.allclose(acts[layer.name][row], whole[layer.name][row], atol=1e-3)
