"""The drift guard: spectral norms, the per-layer bound, the agreement-driven scale."""

import pytest
import torch

from telelora import guard, learned, metaparameters, modelio
from telelora.adapters import Adapter, LowRankDelta
from telelora.architectures import AdaptedLayer, find_adapted_layers
from telelora.chat import agreement, greedy_answers

from .conftest import REPO

CPU = torch.device("cpu")
PROMPTS = ["What is the capital of France?", "Name three prime numbers.", "Why is the sky blue?", "Define entropy."]


def test_spectral_norm_is_that_of_the_full_matrix():
    torch.manual_seed(0)
    for rank, width in ((1, 7), (4, 32), (6, 6)):
        u, v = torch.randn(rank, width), torch.randn(rank, width)
        full = torch.linalg.matrix_norm(v.T.double() @ u.double(), ord=2)
        assert guard.spectral_norm(Adapter(u, v)) == pytest.approx(float(full), rel=1e-9)


def test_layer_ranges_keep_the_largest_per_type():
    assert guard.layer_ranges([("q", 1.0), ("down", 2.0), ("q", 3.0)]) == {"down": 2.0, "q": 3.0}
    assert guard.layer_ranges([("q", 0.1234561)]) == {"q": 0.123457}  # rounded up, never below what was seen


@pytest.fixture(scope="module")
def llama(tiny_models):
    model = modelio.load_model(tiny_models["llama"], CPU, torch.float32)
    return model, modelio.load_tokenizer(tiny_models["llama"]), find_adapted_layers(model, ["q", "down"])


def _adapters(layers, scale):
    torch.manual_seed(1)
    return {x.name: Adapter(torch.randn(2, x.in_features) * scale, torch.randn(2, x.in_features)) for x in layers}


def test_bound_layers_shrinks_only_what_exceeds_the_range(llama):
    _, _, layers = llama
    adapters = _adapters(layers, 0.1)
    norms = {name: guard.spectral_norm(a) for name, a in adapters.items()}
    q_norms = [norms[x.name] for x in layers if x.projection_type == "q"]
    ranges = {"q": min(q_norms) * 0.5, "down": 1e9}
    record = guard.LayerBound()
    bounded = guard.bound_layers(adapters, layers, ranges, 2.0, record)
    for layer in layers:
        after = guard.spectral_norm(bounded[layer.name])
        limit = 2.0 * ranges[layer.projection_type]
        if norms[layer.name] > limit:
            assert after == pytest.approx(limit, rel=1e-6)
        else:
            assert torch.equal(bounded[layer.name].v, adapters[layer.name].v)
    assert record.applied and record.layers_checked == len(layers)
    assert record.layers_shrunk == sum(norms[x.name] > 2.0 * ranges[x.projection_type] for x in layers)
    assert record.largest_ratio == pytest.approx(max(q_norms) / (2.0 * ranges["q"]), rel=1e-6)


def test_bound_layers_is_off_without_ranges_or_factor(llama):
    _, _, layers = llama
    adapters = _adapters(layers, 1.0)
    for ranges, factor, reason in ((None, 1.0, "record no layer ranges"), ({"q": 1e-9}, 0.0, "off")):
        record = guard.LayerBound()
        assert guard.bound_layers(adapters, layers, ranges, factor, record) is adapters
        assert not record.applied and reason in record.reason


def _hooked(layers, delta):
    return lambda scale: delta.applied(layers, factor=scale)


def _delta(layers, scale):
    delta = LowRankDelta()
    delta.add_step(layers, _adapters(layers, scale), step_size=1.0)
    return delta


def test_fit_scale_shrinks_a_wrecking_change_until_the_answers_agree(llama):
    model, tok, layers = llama
    weights = {x.name: x.module.weight.clone() for x in layers}
    delta = _delta(layers, 3.0)  # large random change: the tiny model's answers fall apart
    full = {name: b.clone() for name, (_, b) in delta.factors.items()}
    record = guard.fit_scale(model, tok, _hooked(layers, delta), PROMPTS, 0.8, answer_tokens=6, batch_size=2)
    assert record.applied and record.agreement_unscaled < 0.8
    assert 0 <= record.scale < 1 and record.agreement >= 0.8 and record.evaluations == 1 + guard.SEARCH_STEPS
    assert all(torch.equal(b, full[name]) for name, (_, b) in delta.factors.items())  # scaling is the caller's
    delta.scale(record.scale)
    answers = greedy_answers(model, tok, PROMPTS, 6, 2)
    with delta.applied(layers):  # the delta now holds the scaled change
        assert agreement(model, tok, PROMPTS, answers, 2) == pytest.approx(record.agreement)
    assert all(torch.equal(x.module.weight, weights[x.name]) for x in layers)  # hooks only


def test_fit_scale_keeps_a_change_that_stays_close_or_when_off(llama):
    model, tok, layers = llama
    delta = _delta(layers, 1e-6)
    record = guard.fit_scale(model, tok, _hooked(layers, delta), PROMPTS, 0.8, answer_tokens=6, batch_size=2)
    assert record.applied and record.scale == 1.0 and record.agreement == 1.0 and record.evaluations == 1
    off = guard.fit_scale(model, tok, _hooked(layers, _delta(layers, 3.0)), PROMPTS, 0.0, answer_tokens=6, batch_size=2)
    assert not off.applied and off.scale == 1.0 and off.evaluations == 0


def test_shipped_ranges_bound_a_wide_layer_with_outlier_dimensions():
    """Finding of the round review: at Llama-8B's down_proj width (14336), wider than any the
    generators were trained on, a few BOS-like outlier dimensions make the shipped generators
    stretch inputs beyond anything seen in training; the layer bound brings it back."""
    meta = metaparameters.load()
    bank, info = learned.load_bank(REPO / "learned_parameters", meta)
    ranges = info["layer_ranges"]
    torch.manual_seed(0)
    shape = (meta.num_reference_texts, 14336)
    x = torch.randn(shape).abs() * 0.1 + torch.randn(shape)  # slightly skewed, as post-activation inputs are
    x[:, :4] = x[:, :4] * 300 + 50
    with torch.no_grad():
        adapter = Adapter(*bank("down", x, 1.0, meta.rank))
    layer = AdaptedLayer("model.layers.31.mlp.down_proj", torch.nn.Linear(14336, 8, bias=False), "down", 31, 1.0)
    assert guard.spectral_norm(adapter) > ranges["down"]  # beyond the training range
    record = guard.LayerBound()
    bounded = guard.bound_layers({layer.name: adapter}, [layer], ranges, meta.guard_layer_factor, record)
    assert record.layers_shrunk == 1 and record.largest_ratio > 1
    limit = meta.guard_layer_factor * ranges["down"]
    assert guard.spectral_norm(bounded[layer.name]) == pytest.approx(limit, rel=1e-6)
