import dataclasses
import math

import pytest
import torch

from telelora import alignment, chat, modelio, texts
from telelora.architectures import decoder_blocks, find_adapted_layers
from telelora.errors import TeleLoRAError
from telelora.lab import baselines

from ..conftest import REPO


@pytest.fixture(scope="module")
def few_texts() -> texts.Texts:
    """Twelve reference prompts: two LoRA steps of batch 8, one of them partial."""
    shipped = texts.load(REPO / "learned_parameters")
    return dataclasses.replace(shipped, reference=shipped.reference[:12])


def load(tiny_models, arch: str):
    return modelio.load_model(tiny_models[arch], torch.device("cpu"), torch.float32)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def run(name, tiny_models, arch, few_texts, meta, seed):
    model = load(tiny_models, arch)
    tokenizer = modelio.load_tokenizer(tiny_models[arch])
    return model, baselines.apply_baseline(name, model, tokenizer, few_texts, meta, seed)


def assert_frozen(model):
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_unknown_baseline_names_the_valid_ones(small_meta, few_texts):
    with pytest.raises(TeleLoRAError) as err:
        baselines.apply_baseline("fine_pruning", None, None, few_texts, small_meta, 0)
    message = str(err.value)
    assert "fine_pruning" in message and "\n" not in message
    assert all(name in message for name in baselines.BASELINES)


@pytest.mark.parametrize("arch, tied", [("llama", False), ("gemma3", True)])
def test_embedding_dropout(tiny_models, small_meta, few_texts, arch, tied):
    before = snapshot(load(tiny_models, arch))
    model, facts = run("embedding_dropout", tiny_models, arch, few_texts, small_meta, seed=3)
    embedding = model.get_input_embeddings().weight
    name = next(n for n, p in model.named_parameters() if p is embedding)
    # with tied embeddings the output head is this very tensor, so it is hit as well
    assert (model.get_output_embeddings().weight is embedding) == tied
    assert before[name].ne(0).all()
    dropped = embedding == 0
    assert abs(dropped.float().mean().item() - 0.2) < 0.02
    assert facts["zeroed_fraction"] == pytest.approx(dropped.float().mean().item())
    assert torch.equal(embedding[~dropped], before[name][~dropped] * 1.25)
    for other, value in model.named_parameters():
        if other != name:
            assert torch.equal(value, before[other]), other
    assert_frozen(model)
    assert facts["seconds"] >= 0

    again, _ = run("embedding_dropout", tiny_models, arch, few_texts, small_meta, seed=3)
    assert torch.equal(again.get_input_embeddings().weight, embedding)
    other_seed, _ = run("embedding_dropout", tiny_models, arch, few_texts, small_meta, seed=4)
    assert not torch.equal(other_seed.get_input_embeddings().weight == 0, dropped)


@pytest.mark.parametrize("arch", ["phi3", "qwen2"])  # fused qkv_proj/gate_up_proj; separate projections with biases
def test_magnitude_pruning(tiny_models, small_meta, few_texts, arch):
    before = snapshot(load(tiny_models, arch))
    model, facts = run("magnitude_pruning", tiny_models, arch, few_texts, small_meta, seed=0)
    pruned = {layer.name + ".weight" for layer in find_adapted_layers(model, small_meta.target_projections)}
    if arch == "phi3":
        assert {name.rsplit(".", 2)[-2] for name in pruned} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert facts["layers"] == len(pruned)
    assert facts["zeroed_fraction"] == pytest.approx(0.2, abs=1e-3)
    params = dict(model.named_parameters())
    for name in pruned:
        old, new = before[name], params[name]
        zero = new == 0
        assert old.ne(0).all()
        assert abs(zero.sum().item() - 0.2 * old.numel()) <= 1, name  # of the whole (fused) matrix
        assert torch.equal(new[~zero], old[~zero])
        assert old[zero].abs().max() <= old[~zero].abs().min(), name
    untouched = set(params) - pruned
    assert any("embed" in name for name in untouched) and any("norm" in name for name in untouched)
    if arch == "qwen2":
        assert any(name.endswith("q_proj.bias") for name in untouched)
    for name in untouched:
        assert torch.equal(params[name], before[name]), name
    assert_frozen(model)


def test_lora_finetune_merges_into_the_callers_model(tiny_models, small_meta, few_texts):
    before = snapshot(load(tiny_models, "llama"))
    model, facts = run("lora_finetune", tiny_models, "llama", few_texts, small_meta, seed=5)
    assert set(facts) >= {"seconds", "steps", "examples", "final_loss"}
    assert (facts["steps"], facts["examples"]) == (2, 12)
    assert math.isfinite(facts["final_loss"])

    after = snapshot(model)
    assert list(after) == list(before)  # same names: no peft wrappers or lora_ weights left behind
    assert not hasattr(model, "peft_config")
    linear = {layer.name + ".weight" for layer in find_adapted_layers(model, small_meta.target_projections)}
    assert len(linear) == 14  # 2 blocks x 7 projections, all plain nn.Linear again
    for name in linear:
        assert not torch.equal(after[name], before[name]), name
    for name in set(after) - linear:  # embeddings, norms and the untied output head are not LoRA targets
        assert torch.equal(after[name], before[name]), name
    assert_frozen(model)
    logits = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size)

    again, again_facts = run("lora_finetune", tiny_models, "llama", few_texts, small_meta, seed=5)
    assert again_facts["final_loss"] == facts["final_loss"]
    for name, value in again.named_parameters():
        assert torch.equal(value, after[name]), name


def test_consistency_loss_is_zero_for_identical_states_and_matches_a_hand_computation():
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding: left out of the mean
    h1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    assert baselines.consistency_loss([h1, h1, 3 * h1], mask).item() == pytest.approx(0.0, abs=1e-7)

    h2 = torch.tensor([[[2.0, 2.0], [0.0, -1.0], [-5.0, 1.0]]])  # cos with h1: 1/sqrt(2), -1
    pair = ((1 - 1 / math.sqrt(2)) + 2) / 2
    assert baselines.consistency_loss([h1, h2], mask).item() == pytest.approx(pair)
    assert baselines.consistency_loss([h1, h2, h2], mask).item() == pytest.approx(pair / 2)  # mean over pairs
    with pytest.raises(TeleLoRAError):
        baselines.consistency_loss([h1], mask)


def test_sign_gradient_step_moves_each_real_embedding_entry_by_epsilon():
    torch.manual_seed(0)
    embeds = torch.randn(2, 3, 4, requires_grad=True)
    slope = torch.randn(2, 3, 4)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    delta = baselines.sign_gradient_step((embeds * slope).sum(), embeds, mask, epsilon=0.1)
    assert torch.equal(delta, 0.1 * slope.sign() * mask[..., None])
    assert delta.abs().max().item() == pytest.approx(0.1)
    assert torch.equal(delta[0, 0], torch.zeros(4))


def test_crow_perturbation_raises_the_consistency_loss_and_spares_padding(tiny_models, few_texts):
    model = load(tiny_models, "llama")
    tokenizer = modelio.load_tokenizer(tiny_models["llama"])
    examples = []
    for prompt in few_texts.reference[:3]:  # prompts of different lengths: left padding
        head = chat.prompt_ids(tokenizer, prompt)
        examples.append(alignment.Example(head + [5, 6], [alignment.IGNORE_INDEX] * len(head) + [5, 6]))
    batch = alignment.collate(examples, chat.pad_id(tokenizer), torch.device("cpu"))
    real = batch["attention_mask"].bool()
    assert not real.all()
    blocks = decoder_blocks(model)

    delta = baselines.crow_perturbation(model, blocks, batch, baselines.CROW_EPSILON)
    assert torch.equal(delta[~real], torch.zeros_like(delta[~real]))
    assert torch.equal(delta[real].abs(), torch.full_like(delta[real], 0.1))  # prompt and answer tokens alike
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    with torch.no_grad():
        clean = baselines.embeds_consistency(model, blocks, embeds, batch)
        perturbed = baselines.embeds_consistency(model, blocks, embeds + delta, batch)
    assert perturbed > clean > 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # Gemma 3: scaled and tied embeddings
def test_crow_changes_the_linear_layers_and_merges_the_adapter_exactly(
    tiny_models, small_meta, few_texts, monkeypatch, arch
):
    probe = torch.tensor([[5, 6, 7, 8]])
    adapted: dict[str, torch.Tensor] = {}

    def merge_after_recording(peft_model, model):
        with torch.no_grad():
            adapted["logits"] = peft_model(input_ids=probe).logits
        merge(peft_model, model)

    merge = baselines.merge_lora
    monkeypatch.setattr(baselines, "merge_lora", merge_after_recording)
    before = snapshot(load(tiny_models, arch))
    eight = dataclasses.replace(few_texts, reference=few_texts.reference[:8])  # 5 steps: one batch per epoch
    model, facts = run("crow", tiny_models, arch, eight, small_meta, seed=5)
    assert (facts["steps"], facts["examples"]) == (5, 8)
    assert (facts["epsilon"], facts["alpha"]) == (0.1, 5.5)
    assert all(math.isfinite(facts[k]) for k in ("final_loss", "final_lm_loss", "final_consistency_loss"))
    assert facts["final_loss"] == pytest.approx(facts["final_lm_loss"] + 5.5 * facts["final_consistency_loss"])

    after = snapshot(model)
    assert list(after) == list(before)  # no peft wrappers or lora_ weights left behind
    linear = {layer.name + ".weight" for layer in find_adapted_layers(model, small_meta.target_projections)}
    assert len(linear) == 14
    for name in linear:
        assert not torch.equal(after[name], before[name]), name
    untouched = set(after) - linear
    assert any("embed" in name for name in untouched) and any("norm" in name for name in untouched)
    for name in untouched:
        assert torch.equal(after[name], before[name]), name
    assert_frozen(model)
    with torch.no_grad():
        merged = model(input_ids=probe).logits
    assert torch.allclose(merged, adapted["logits"], atol=1e-5, rtol=1e-4)


def test_crow_is_deterministic_for_a_seed(tiny_models, few_texts):
    tokenizer = modelio.load_tokenizer(tiny_models["llama"])

    def crow(seed: int):
        model = load(tiny_models, "llama")
        facts = baselines.crow(model, tokenizer, few_texts.reference, seed, answer_tokens=4, samples=4)
        return snapshot(model), facts

    weights, facts = crow(5)
    assert (facts["steps"], facts["examples"]) == (5, 4)  # the first 4 prompts, one batch per epoch
    again, again_facts = crow(5)
    assert again_facts == facts
    for name, value in again.items():
        assert torch.equal(value, weights[name]), name
    other, _ = crow(6)
    assert any(not torch.equal(other[name], weights[name]) for name in weights)
