import dataclasses
import math

import pytest
import torch

from telelora import modelio, texts
from telelora.architectures import find_adapted_layers
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
