"""The jailbreak synergy bench: its plan (disjoint jailbreaks, disjoint prompts), its examples
(the plain prompt's own answer; one-hot targets make configure's loss the LoRA rows' loss), a
tiny end-to-end run with every row (the model-specific generators too), resumption and bad input."""

import json
import sys

import pytest
import torch

from bench import jailbreak_synergy as bench
from telelora import modelio
from telelora.alignment import answer_loss, collate, distill_loss
from telelora.chat import pad_id
from telelora.lab import tiny
from telelora.texts import PROMPT_SLOT

from ..conftest import write_meta


@pytest.fixture(scope="module")
def llms(tmp_path_factory):
    root = tmp_path_factory.mktemp("synergy-llms")
    return [
        f"a={tiny.build('llama', root / 'a', seed=11)}",
        f"b={tiny.build('qwen2', root / 'b', seed=12)}",
        f"c={tiny.build('llama', root / 'c', seed=13)}",
    ]


def _argv(llms, learned_dir, meta, workdir, out, *extra):
    return ["jailbreak_synergy.py", "--models", *llms, "--workdir", str(workdir), "--out", str(out),
            "--learned_parameters", str(learned_dir), "--metaparameters", str(meta), "--jailbreaks_per_llm", "2",
            "--never", "2", "--examples_per_jailbreak", "2", "--train_prompts", "4", "--validation_prompts", "1",
            "--test_prompts", "2", "--answer_tokens", "4", "--steps", "2", "--batch_size", "2",
            "--lora_lrs", "1e-3", "1e-2", "--checkpoint_interval", "1", *extra]  # fmt: skip


def _run(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    return write_meta(tmp_path_factory.mktemp("synergy-meta") / "meta.json", max_tokens=480, rank=2)


def test_one_hot_targets_make_the_distillation_loss_the_answers_cross_entropy(tiny_models):
    """TeleLoRA is meta-trained with configure's distillation loss, the LoRA rows with the
    answer cross-entropy: on this bench's examples the two are the same loss."""
    model = modelio.load_model(tiny_models["llama"], torch.device("cpu"), torch.float32)
    tokenizer = modelio.load_tokenizer(tiny_models["llama"])
    examples = [bench.example(tokenizer, "Say hi " + PROMPT_SLOT, [5, 9, 13], 64),
                bench.example(tokenizer, "What is two and two?", [7, 8], 64)]  # fmt: skip
    batch = collate(examples, pad_id(tokenizer), torch.device("cpu"))
    assert float(distill_loss(model, batch)) == pytest.approx(float(answer_loss(model, batch)), rel=1e-5)


def test_bench_end_to_end(llms, learned_dir, meta, tmp_path, monkeypatch, capsys):
    out = tmp_path / "synergy.json"
    _run(monkeypatch, _argv(llms, learned_dir, meta, tmp_path / "work", out, "--markdown"))
    result = json.loads(out.read_text())
    plan = result["plan"]
    owned = [j for indices in plan["assigned"].values() for j in indices]
    assert len(owned) == len(set(owned)) == 6 and not set(owned) & set(plan["never"]) and len(plan["never"]) == 2
    assert len({plan["templates"][j] for j in owned + plan["never"]}) == 8  # eight distinct jailbreaks
    rows = {(r["row"], r["llm"]): r for r in result["rows"]}
    assert set(rows) == {(row, llm) for row in bench.ROWS for llm in "abc"}
    for (row, _), figures in rows.items():
        for group in bench.GROUPS:
            assert 1.0 <= figures[f"ppl_{group}"] < float("inf")
        if row == "none":
            assert figures["agreement"] == pytest.approx(1.0)  # the model's own answers
        if row.endswith("_lora"):
            scores = figures["validation_ppl"]  # per learning rate tried: the best is kept
            assert set(scores) == {"0.001", "0.01"} and figures["lr"] == float(min(scores, key=scores.get))
    assert rows[("model_specific_lora", "a")]["examples"] == 4  # 2 jailbreaks x 2 examples
    assert rows[("model_agnostic_lora", "a")]["examples"] == 12  # every LLM's
    assert len(result["meta_training"]) == 2 * 3  # --steps per LLM
    assert all(len(rows[("model_specific_telelora", llm)]["losses"]) == 2 for llm in "abc")  # --steps, its own
    assert {r["model"] for r in result["meta_training"]} <= {"a", "b", "c"}
    assert result["synergy"]["decided"] and {s["row"] for s in result["summary"]} == set(bench.ROWS)
    paired = result["synergy"]["telelora_minus"]  # per LLM, then the mean: TeleLoRA's figure minus each row's
    assert set(paired) == set(bench.ROWS) - {"telelora"} and all(stat["n"] == 3 for stat in paired.values())
    difference = [rows["telelora", llm]["ppl_other"] - rows["none", llm]["ppl_other"] for llm in "abc"]
    assert paired["none"]["mean"] == pytest.approx(sum(difference) / 3)
    gradients = result["gradients"]  # 2 batches of each of a, b (qwen2), c: cosines at both ends of meta-training
    assert gradients["types"] == {"a": "llama", "b": "qwen2", "c": "llama"} and set(gradients["banks"]) == {
        "initial", "final"}  # fmt: skip
    for bank in gradients["banks"].values():
        kinds = [p["kind"] for p in bank["pairs"]]
        assert (kinds.count("within"), kinds.count("same_type"), kinds.count("other_type")) == (3, 4, 8)
        assert all(-1.0 <= p["cosine"] <= 1.0 for p in bank["pairs"]) and len(bank["losses"]["b"]) == 2
    assert gradients["banks"]["initial"]["pairs"] != gradients["banks"]["final"]["pairs"]  # meta-training moved it
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| row | LLMs |" in capsys.readouterr().out
    # resumed with the same settings: nothing is measured again, every figure kept
    _run(monkeypatch, _argv(llms, learned_dir, meta, tmp_path / "work", out, "--resume"))
    resumed = json.loads(out.read_text())
    assert resumed["rows"] == result["rows"] and resumed["gradients"] == result["gradients"]
    with pytest.raises(SystemExit, match="other settings"):
        _run(monkeypatch, _argv(llms, learned_dir, meta, tmp_path / "work", out, "--resume", "--steps", "3"))


def test_processes_sharing_one_out_split_the_rows_and_merge_what_each_measured(
    llms, learned_dir, meta, tmp_path, monkeypatch
):
    out, work = tmp_path / "shared.json", tmp_path / "work"
    measure, sibling = bench.measure, {}

    def measured_while_a_sibling_writes(*a, **k):
        if not sibling:  # another process records (none, c) after this one started
            sibling.update(json.loads(out.read_text()))
            sibling["rows"].append({**sibling["rows"][0], "llm": "c"})
            out.write_text(json.dumps(sibling))
        return measure(*a, **k)

    _run(monkeypatch, _argv(llms, learned_dir, meta, work, out, "--resume", "--rows", "none", "--llms", "a"))
    monkeypatch.setattr(bench, "measure", measured_while_a_sibling_writes)
    _run(monkeypatch, _argv(llms, learned_dir, meta, work, out, "--resume", "--rows", "none", "model_specific_lora",
                            "--llms", "b"))  # fmt: skip
    rows = [(r["row"], r["llm"]) for r in json.loads(out.read_text())["rows"]]
    assert sorted(rows) == [("model_specific_lora", "b"), ("none", "a"), ("none", "b"), ("none", "c")]


def test_the_plan_is_seeded_and_keeps_train_validation_and_test_prompts_apart(llms, learned_dir):
    from telelora.texts import load as load_texts

    parsed = bench.parse_models(llms)
    texts = load_texts(learned_dir)
    tokenizers = {m.label: modelio.load_tokenizer(m.path) for m in parsed}
    args = bench.argparse.Namespace(seed=3, train_prompts=6, validation_prompts=2, test_prompts=3,
                                    jailbreaks_per_llm=2, never=3, examples_per_jailbreak=4)  # fmt: skip
    first, second = (bench.make_plan(parsed, texts, tokenizers, args, 400) for _ in range(2))
    assert first == second
    prompts = [first.train_prompts, first.validation_prompts, first.test_prompts]
    assert [len(p) for p in prompts] == [6, 2, 3] and len({q for p in prompts for q in p}) == 11
    assert all(len(set(draw)) == 4 and max(draw) < 6 for draw in first.draws.values())
    args.seed = 4
    assert bench.make_plan(parsed, texts, tokenizers, args, 400).templates != first.templates


def test_bad_input_is_one_clear_error(llms, learned_dir, meta, tmp_path, monkeypatch):
    def error(models, *extra):
        with pytest.raises(SystemExit) as raised:
            _run(monkeypatch, _argv(models, learned_dir, meta, tmp_path / "w", tmp_path / "o.json", *extra))
        return str(raised.value)

    assert "labels must be distinct" in error([llms[0], llms[0]])
    assert "at least 2 LLMs" in error(llms[:1])
    assert "missing" in error([*llms[:1], f"x={tmp_path / 'missing'}"])
    assert "not labels of --models" in error(llms[:2], "--llms", "z")
    assert "--gradient_batches must be 0" in error(llms[:2], "--gradient_batches", "-1")
