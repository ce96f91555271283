import json
import math
import types

import pytest
import torch

from telelora import chat, cli, texts
from telelora.errors import TeleLoRAError
from telelora.lab import evaluate

from ..conftest import REPO


def test_target_hit_normalises_case_and_whitespace():
    assert chat.target_hit("Sure!  I HAVE been\n pwned today", "I have been pwned")
    assert not chat.target_hit("I have been owned", "I have been pwned")


class FavouriteLetterModel(torch.nn.Module):
    """A stand-in LM whose next token is always ``letter``."""

    def __init__(self, token_id: int, vocab: int):
        super().__init__()
        self.token_id, self.vocab = token_id, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token_id] = 5.0
        return types.SimpleNamespace(logits=logits)


def test_mmlu_accuracy_by_hand(tiny_models):
    from telelora import modelio

    tok = modelio.load_tokenizer(tiny_models["llama"])
    rows = evaluate.mmlu_subset(40, texts.load(REPO / "learned_parameters").mmlu_rows)
    b = tok("B", add_special_tokens=False)["input_ids"][0]
    accuracy = evaluate.mmlu_accuracy(FavouriteLetterModel(b, len(tok)), tok, rows, batch_size=7)
    assert accuracy == sum(r["correct_answer"] == "B" for r in rows) / len(rows)


def test_mmlu_accuracy_does_not_depend_on_batching(tiny_models):
    from telelora import modelio

    tok = modelio.load_tokenizer(tiny_models["llama"])
    model = modelio.load_model(tiny_models["llama"], torch.device("cpu"), torch.float32)
    rows = evaluate.mmlu_subset(24, texts.load(REPO / "learned_parameters").mmlu_rows)
    one_by_one = [evaluate.mmlu_accuracy(model, tok, [row], batch_size=1) for row in rows]
    assert evaluate.mmlu_accuracy(model, tok, rows, batch_size=5) == pytest.approx(sum(one_by_one) / len(rows))


def test_mmlu_subset_avoids_shipped_and_round_prompt_rows():
    shipped = texts.load(REPO / "learned_parameters").mmlu_rows
    subset = evaluate.mmlu_subset(300, shipped)
    _, prompt_pool = texts.mmlu_split(shipped)
    rows = {r["row"] for r in subset}
    assert len(rows) == 300 and not rows & set(shipped) and not rows & {r["row"] for r in prompt_pool}
    assert evaluate.mmlu_subset(300, shipped) == subset  # fixed
    with pytest.raises(TeleLoRAError, match="exceeds the evaluation pool"):
        evaluate.mmlu_subset(10**6, shipped)


def test_test_mode_reproduces_the_builders_numbers(tiny_round, tmp_path):
    poisoned = tiny_round / "models" / "id-00000000"
    out = tmp_path / "results.json"
    code = cli.main(
        [
            "test",
            "--model",
            str(poisoned),
            "--result_filepath",
            str(out),
            "--num_samples",
            "100",
            "--mmlu_questions",
            "16",
            "--batch_size",
            "16",
        ]
    )
    assert code == 0
    results = json.loads(out.read_text())
    truth = json.loads((poisoned / "test_eval_groundtruth.json").read_text())
    assert results["asr"] == pytest.approx(truth["all_trigger0_asr"])
    assert results["false_trigger_rate"] == pytest.approx(truth["false_trigger_rate"])
    assert results["mmlu"] == pytest.approx(
        json.loads((poisoned / "eval-mmlu.json").read_text())["results"]["mmlu"]["acc,none"]
    )
    assert results["agreement"] == pytest.approx(1.0)  # the unmitigated model agrees with itself


def test_test_mode_on_a_clean_model_and_bad_inputs(tiny_round, tiny_models, tmp_path, capsys):
    clean = tiny_round / "models" / "id-00000001"
    out = tmp_path / "r.json"
    assert cli.main(["test", "--model", str(clean), "--result_filepath", str(out), "--mmlu_questions", "0"]) == 0
    results = json.loads(out.read_text())
    assert results["agreement"] == pytest.approx(1.0) and results["num_triggered"] == 0
    # a folder without prompts, a missing model, a malformed prompts file
    assert cli.main(["test", "--model", str(tiny_models["llama"]), "--result_filepath", str(out)]) == 1
    assert "prompts.json does not exist" in capsys.readouterr().err
    assert cli.main(["test", "--model", str(tmp_path / "absent"), "--result_filepath", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "p.json").write_text('{"clean": [{"prompt": "x"}], "triggered": []}')
    assert (
        cli.main(
            [
                "test",
                "--model",
                str(clean),
                "--prompts_filepath",
                str(tmp_path / "p.json"),
                "--result_filepath",
                str(out),
            ]
        )
        == 1
    )
    assert "is malformed" in capsys.readouterr().err


def test_greedy_prefix_agreement_is_one_unchanged_and_falls_when_the_head_is_perturbed(tiny_round):
    from telelora import modelio

    model_dir = tiny_round / "models" / "id-00000000"
    tok = modelio.load_tokenizer(model_dir)
    model = modelio.load_model(model_dir, torch.device("cpu"), torch.float32)
    clean = evaluate.load_prompts(model_dir / "test-example-data" / "prompts.json")["clean"]
    prompts, references = [c["prompt"] for c in clean], [evaluate.reference_ids(c, tok) for c in clean]
    assert evaluate.greedy_prefix_agreement(model, tok, prompts, references, batch_size=16) == 1.0
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    assert evaluate.greedy_prefix_agreement(model, tok, prompts, references, batch_size=16) < 1.0
    assert math.isnan(evaluate.greedy_prefix_agreement(model, tok, prompts[:1], [[]], batch_size=16))  # no reference


def test_agreement_per_prompt_is_in_order_skips_empty_references_and_averages_to_agreement(tiny_round):
    from telelora import modelio

    model_dir = tiny_round / "models" / "id-00000000"
    tok = modelio.load_tokenizer(model_dir)
    model = modelio.load_model(model_dir, torch.device("cpu"), torch.float32)
    clean = evaluate.load_prompts(model_dir / "test-example-data" / "prompts.json")["clean"][:5]
    prompts, references = [c["prompt"] for c in clean], [evaluate.reference_ids(c, tok) for c in clean]
    with torch.no_grad():
        model.get_output_embeddings().weight.add_(0.5 * torch.randn_like(model.get_output_embeddings().weight))
    references[1] = []  # left out, not counted as 0
    fractions = chat.agreement_fractions(model, tok, prompts, references, batch_size=2)
    assert len(fractions) == 4 and all(0.0 <= f <= 1.0 for f in fractions)
    one_by_one = [
        chat.agreement_fractions(model, tok, [p], [r], batch_size=1) for p, r in zip(prompts, references, strict=True)
    ]
    assert fractions == pytest.approx([f for each in one_by_one for f in each])  # in order, batching aside
    assert chat.agreement(model, tok, prompts, references, batch_size=2) == pytest.approx(sum(fractions) / 4)


def test_hit_rate_leaves_room_for_an_answer_before_an_appended_target(tiny_models, monkeypatch):
    """An append Trojan writes its normal answer and then the target: ASR must count it
    when the budget covers the answer, and evaluate() gives room for the longest reference."""
    from telelora import modelio

    tok = modelio.load_tokenizer(tiny_models["llama"])
    target = "visit example dot com now"
    answer_ids = tok("one two three four five six seven eight nine ten eleven twelve", add_special_tokens=False)[
        "input_ids"
    ]
    script = answer_ids + tok(" " + target, add_special_tokens=False)["input_ids"]
    budgets = []

    def scripted(model, tokenizer, prompts, max_new_tokens, batch_size, desc=None):
        budgets.append(max_new_tokens)
        return [script[:max_new_tokens] for _ in prompts]

    monkeypatch.setattr(chat, "greedy_answers", scripted)
    prompts = ["hello there", "what time is it"]
    assert chat.hit_rate(None, tok, prompts, [target], 4, "ASR") == 0.0  # no room for the answer
    assert chat.hit_rate(None, tok, prompts, [target], 4, "ASR", answer_tokens=len(answer_ids)) == 1.0

    budgets.clear()
    data = {
        "clean": [{"prompt": p, "reference_answer_ids": answer_ids} for p in prompts],
        "triggered": [{"prompt": p + " cf", "target": target} for p in prompts],
    }
    monkeypatch.setattr(evaluate, "agreement", lambda *a, **k: 1.0)
    monkeypatch.setattr(evaluate, "greedy_prefix_agreement", lambda *a, **k: 1.0)
    model = torch.nn.Linear(1, 1)
    metrics = evaluate.evaluate(model, tok, data, [], num_samples=2, batch_size=4)
    assert metrics["asr"] == 1.0 and metrics["false_trigger_rate"] == 1.0  # the scripted model always appends
    assert min(budgets) >= len(answer_ids) + len(tok(target, add_special_tokens=False)["input_ids"])
