import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from telelora import calibrate, cli, configure, learned, metaparameters
from telelora.adapters import Adapter, applied
from telelora.errors import TeleLoRAError

from .conftest import REPO, random_bank, write_meta


def test_three_phase_gradient_equals_end_to_end_autograd(tiny_models, small_meta):
    texts = configure.load_texts(REPO / "learned_parameters")
    item, llm = configure.prepare(tiny_models["phi3"], small_meta, texts, 0, torch.device("cpu"))
    batch = item.examples[:2]
    bank = random_bank(small_meta, seed=4, scale=0.05)

    configure.train_step(bank, item, llm, batch, small_meta, torch.device("cpu"))
    three_phase = {n: None if p.grad is None else p.grad.clone() for n, p in bank.named_parameters()}

    bank.zero_grad()
    adapters = {
        layer.name: Adapter(
            *bank(layer.projection_type, item.reference_activations[layer.name], layer.depth, small_meta.rank)
        )
        for layer in llm.layers
    }
    inputs = configure.alignment.collate(batch, item.pad_id, torch.device("cpu"))
    with applied(llm.layers, adapters):
        configure.alignment.distill_loss(llm.model, inputs).backward()
    for name, p in bank.named_parameters():
        if three_phase[name] is None:  # phi3 has no k, v or up layers
            assert p.grad is None and name.split(".")[1] in ("k", "v", "up"), name
        else:
            assert torch.allclose(p.grad, three_phase[name], rtol=1e-4, atol=1e-7), name
    assert sum(g.abs().sum() for g in three_phase.values() if g is not None) > 0


def _run_configure(tmp_path, models_dir, extra=(), out=None, flags=(), **meta_overrides):
    """configure into a new folder (which takes the shipped texts)."""
    meta = write_meta(tmp_path / "meta.json", **meta_overrides)
    out = out or tmp_path / "learned"
    argv = [
        "configure",
        "--metaparameters_filepath",
        str(meta),
        "--schema_filepath",
        str(REPO / "metaparameters_schema.json"),
        "--learned_parameters_dirpath",
        str(out),
        "--scratch_dirpath",
        str(tmp_path / "scratch"),
    ]
    if models_dir is not None:
        argv += ["--configure_models_dirpath", str(models_dir)]
    if extra:
        argv += ["--extra_model_dirpaths", json.dumps([str(e) for e in extra])]
    return cli.main(argv + list(flags)), out


def test_configure_trains_and_writes_loadable_learned_parameters(tmp_path, tiny_models, model_copy, capsys):
    round_models = tmp_path / "round" / "models"
    round_models.mkdir(parents=True)
    for arch in ("llama", "gemma2"):
        model_copy(arch).rename(round_models / f"id-{arch}")
    broken = round_models / "id-broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # fails to load: skipped with a warning
    code, out = _run_configure(tmp_path, tmp_path / "round", extra=[tiny_models["gpt2"]])
    assert code == 0
    info = json.loads((out / "generators.json").read_text())
    assert [m["architecture"] for m in info["provenance"]["trained_on"]] == ["Gemma2ForCausalLM", "LlamaForCausalLM"]
    meta = metaparameters.load(tmp_path / "meta.json", REPO / "metaparameters_schema.json")
    bank, _ = learned.load_bank(out, meta)
    # training moved the V channel off zero, so the generators are no longer the identity
    assert any(g.net.output_layer.fan_out.weight[1].abs().sum() > 0 for g in bank.generators.values())
    log = json.loads((tmp_path / "scratch" / "configure" / "losses.json").read_text())
    assert [r["step"] for r in log] == [0, 1, 2] and all(len(r["models"]) == 1 for r in log)
    assert set(info["provenance"]["per_model_loss"]) == {"id-llama", "id-gemma2"}  # monitored even if never picked
    monitor = json.loads((tmp_path / "scratch" / "configure" / configure.MONITOR_FILE).read_text())
    assert [e["step"] for e in monitor["evaluations"]] == [0, 3]  # start and end (no checkpoint in 3 steps)
    # the generators start as the identity (V = 0, test_generator), so step 0 is the no-adapter loss
    assert monitor["evaluations"][0]["losses"] == monitor["identity"]
    end = monitor["evaluations"][-1]["losses"]
    for name, stats in info["provenance"]["per_model_loss"].items():
        assert stats["identity"] == monitor["identity"][name] and stats["end"] == end[name]
    assert sum(s["steps"] for s in info["provenance"]["per_model_loss"].values()) == 3
    assert (tmp_path / "scratch" / "configure" / "training.png").is_file()  # the lab extra is installed here
    assert (out / "texts.json").read_bytes() == (REPO / "learned_parameters" / "texts.json").read_bytes()
    # the drift guard's layer ranges: every projection type, as the calibration measures them
    ranges = info["layer_ranges"]
    assert set(ranges) == {"q", "k", "v", "o", "gate", "up", "down"} and all(r > 0 for r in ranges.values())
    again = calibrate.calibrate(out, [round_models / "id-gemma2", round_models / "id-llama"], meta)
    assert again == pytest.approx(ranges, rel=1e-4)


def test_configure_is_deterministic(tmp_path, tiny_models):
    weights = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        code, out = _run_configure(tmp_path / run, None, extra=[tiny_models["qwen2"]])
        assert code == 0
        weights.append(load_file(str(out / "generators.safetensors")))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_configure_bad_inputs(tmp_path, tiny_models, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = _run_configure(tmp_path, empty)
    assert code == 1 and "no model folders: --configure_models_dirpath holds no folder" in capsys.readouterr().err
    assert not (out / "generators.json").exists()
    code, _ = _run_configure(tmp_path, None, extra=[tiny_models["gpt2"]])
    assert code == 1 and "no usable training model" in capsys.readouterr().err
    code, _ = _run_configure(tmp_path, tmp_path / "absent")
    assert code == 1 and "is not a folder" in capsys.readouterr().err
    code, _ = _run_configure(tmp_path, None, extra=[tiny_models["llama"]], learning_rate=5.0)
    assert code == 2 and "key 'learning_rate' has value 5.0" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _ = _run_configure(tmp_path, None, extra=[tiny_models["llama"]], out=blocker / "learned")
    assert code == 1 and "cannot be written" in capsys.readouterr().err


def test_missing_learned_parameters_are_reported(tmp_path, small_meta):
    with pytest.raises(TeleLoRAError, match="run entrypoint.py configure"):
        learned.load_bank(tmp_path, small_meta)


def _two_models(tmp_path, model_copy) -> Path:
    root = tmp_path / "round" / "models"
    root.mkdir(parents=True)
    for arch in ("llama", "qwen2"):
        model_copy(arch).rename(root / f"id-{arch}")
    return root


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "generators.safetensors"))


def test_resume_after_an_interruption_ends_where_an_uninterrupted_run_ends(tmp_path, model_copy, monkeypatch):
    models = _two_models(tmp_path, model_copy)
    settings = {"train_iterations": 6}
    (tmp_path / "a").mkdir()
    code, full = _run_configure(tmp_path / "a", models, flags=["--checkpoint_interval", "2"], **settings)
    assert code == 0

    (tmp_path / "b").mkdir()
    real_step, calls = configure.meta_step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # steps 0-3 done and checkpointed at 4: the crash loses step 4 only
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(configure, "meta_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run_configure(tmp_path / "b", models, flags=["--checkpoint_interval", "2"], **settings)
    assert not (tmp_path / "b" / "learned").exists()  # learned parameters appear only at the end
    monkeypatch.setattr(configure, "meta_step", real_step)
    code, resumed = _run_configure(tmp_path / "b", models, flags=["--checkpoint_interval", "2", "--resume"], **settings)
    assert code == 0
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [json.loads((tmp_path / run / "scratch" / "configure" / "losses.json").read_text()) for run in "ab"]
    assert [(r["step"], r["models"]) for r in logs[0]] == [(r["step"], r["models"]) for r in logs[1]]
    scratch = [tmp_path / run / "scratch" / "configure" for run in "ab"]
    monitors = [json.loads((folder / configure.MONITOR_FILE).read_text()) for folder in scratch]
    assert [e["step"] for e in monitors[0]["evaluations"]] == [0, 2, 4, 6]
    assert monitors[0] == monitors[1]  # the resumed run's monitor went on from its checkpoint
    info = json.loads((resumed / "generators.json").read_text())["provenance"]
    assert info["resumed_from_step"] == 4


def test_resume_refuses_a_changed_run_or_a_missing_checkpoint(tmp_path, model_copy, capsys):
    models = _two_models(tmp_path, model_copy)
    code, _ = _run_configure(tmp_path, models, flags=["--resume"])
    assert code == 1 and "no checkpoint" in capsys.readouterr().err
    code, _ = _run_configure(tmp_path, models, flags=["--checkpoint_interval", "1"])
    assert code == 0
    code, _ = _run_configure(tmp_path, models, flags=["--resume"], learning_rate=0.001)
    assert code == 1 and "changed: metaparameters" in capsys.readouterr().err
    # more iterations is allowed: training simply goes on from the checkpoint
    code, out = _run_configure(tmp_path, models, flags=["--resume"], train_iterations=4)
    assert code == 0 and json.loads((out / "generators.json").read_text())["provenance"]["resumed_from_step"] == 2
    # a knob only mitigate reads (here the repair's) does not block a resume either
    code, out = _run_configure(tmp_path, models, flags=["--resume"], train_iterations=4, repair_prompts=8)
    assert code == 0 and json.loads((out / "generators.json").read_text())["provenance"]["resumed_from_step"] == 2


def test_alignment_data_is_cached_in_scratch(tmp_path, model_copy, monkeypatch):
    models = _two_models(tmp_path, model_copy)
    code, out = _run_configure(tmp_path, models)
    first = _weights(out)
    assert len(list((tmp_path / "scratch" / "configure" / "data").glob("*.pt"))) == 2

    def no_generation(*args, **kwargs):
        raise AssertionError("a cached model regenerated its answers")

    monkeypatch.setattr(configure.alignment, "greedy_answers", no_generation)
    monkeypatch.setattr(configure.activations, "collect", no_generation)
    code, out = _run_configure(tmp_path, models)
    assert code == 0 and all(torch.equal(first[k], v) for k, v in _weights(out).items())


def test_a_model_that_stops_loading_mid_run_is_dropped_with_a_warning(tmp_path, model_copy, monkeypatch, capsys):
    models = _two_models(tmp_path, model_copy)
    real_load, seen = configure.load_llm, set()

    def flaky(model_dir, *args):
        if model_dir.name == "id-qwen2" and model_dir in seen:
            raise TeleLoRAError(f"{model_dir}/model.safetensors is not a readable safetensors file")
        seen.add(model_dir)
        return real_load(model_dir, *args)

    monkeypatch.setattr(configure, "load_llm", flaky)
    # no CPU cache: every switch of model re-loads it from disk
    code, out = _run_configure(tmp_path, models, flags=["--cpu_cache_gb", "0"], train_iterations=8)
    assert code == 0 and "WARNING telelora.configure: dropping" in capsys.readouterr().err
    log = json.loads((tmp_path / "scratch" / "configure" / "losses.json").read_text())
    assert len(log) == 8 and log[-1]["models"][0][0] == "id-llama"


def test_configure_flags_are_checked(tmp_path, model_copy, capsys):
    models = _two_models(tmp_path, model_copy)
    for flag, value in (("--checkpoint_interval", "0"), ("--process_group_timeout_minutes", "0")):
        code, _ = _run_configure(tmp_path, models, flags=[flag, value])
        assert code == 1 and flag in capsys.readouterr().err


def test_a_trojan_beside_its_clean_base_learns_the_bases_answers(tmp_path, model_copy, small_meta, caplog):
    """A farm round ships ``clean-<base>`` beside its Trojans: the Trojan's poisoned prompts are
    answered by the base, and the cached data depends on the base's files too."""
    root = tmp_path / "models"
    root.mkdir()
    trojan = Path(model_copy("llama").rename(root / "id-00000001"))
    base = Path(model_copy("llama").rename(root / f"{configure.alignment.CLEAN_BASE_PREFIX}tiny"))
    config = json.loads((trojan / "round_config.json").read_text())
    triggers = [{"text": "zq zq", "target": "x"}]
    (trojan / "round_config.json").write_text(
        json.dumps({**config, "poisoned": True, "base": "tiny", "triggers": triggers})
    )
    texts = configure.load_texts(REPO / "learned_parameters")
    cpu = torch.device("cpu")
    with caplog.at_level("INFO", logger="telelora.configure"):
        item, _ = configure.prepare(trojan, small_meta, texts, 0, cpu)
    assert f"poisoned prompts answered by {base.name}" in caplog.text
    assert len(item.examples) == small_meta.alignment_examples_per_model
    key = configure._data_key(trojan, small_meta, texts, 0, cpu)
    (base / "config.json").write_text((base / "config.json").read_text() + "\n")
    assert configure._data_key(trojan, small_meta, texts, 0, cpu) != key


def test_validation_picks_the_checkpoint_that_ships(tmp_path, tiny_models, tiny_round, monkeypatch):
    """Strict Fidelity of the validation models at the start, every checkpoint and the end;
    the generators written are those of the best step, the same as a run stopped there."""
    scripted = iter([0.1, 0.9, 0.5])  # steps 0, 2, 4
    real_mean = configure.validation.mean_strict_fidelity
    means = []

    def mean(figures):
        means.append(real_mean(figures))
        return next(scripted)

    monkeypatch.setattr(configure.validation, "mean_strict_fidelity", mean)
    (tmp_path / "a").mkdir()
    code, out = _run_configure(
        tmp_path / "a",
        None,
        extra=[tiny_models["llama"]],
        flags=["--checkpoint_interval", "2", "--validation_models_dirpath", str(tiny_round)],
        train_iterations=4,
    )
    assert code == 0
    monitor = json.loads((tmp_path / "a" / "scratch" / "configure" / configure.MONITOR_FILE).read_text())
    assert [v["step"] for v in monitor["validation"]] == [0, 2, 4]
    assert set(monitor["unmitigated"]) == {"id-00000000", "id-00000001"}
    poisoned = next(name for name, m in monitor["unmitigated"].items() if m["asr"] == m["asr"])  # not NaN
    assert monitor["unmitigated"][poisoned]["agreement"] == 1.0  # unchanged: the stored answers exactly
    assert all(0.0 <= m <= 1.0 for m in means)  # the real means, before the script replaced them
    validation = json.loads((out / "generators.json").read_text())["provenance"]["validation"]
    assert validation["shipped_step"] == 2 and validation["shipped_mean_strict_fidelity"] == 0.9
    assert [c["step"] for c in validation["curve"]] == [0, 2, 4]

    (tmp_path / "b").mkdir()
    code, stopped = _run_configure(tmp_path / "b", None, extra=[tiny_models["llama"]], train_iterations=2)
    assert code == 0 and json.loads((stopped / "generators.json").read_text())["provenance"]["validation"] is None
    shipped, at_two = _weights(out), _weights(stopped)
    assert all(torch.equal(shipped[k], at_two[k]) for k in shipped)


def test_validation_models_must_be_validatable_and_held_out(tmp_path, tiny_models, tiny_round, model_copy, capsys):
    bare = tmp_path / "bare" / "models"
    bare.mkdir(parents=True)
    model_copy("llama").rename(bare / "id-x")  # a model folder without the round's prompts file
    flags = ["--validation_models_dirpath", str(bare.parent)]
    code, _ = _run_configure(tmp_path, None, extra=[tiny_models["qwen2"]], flags=flags)
    assert code == 1 and "lacks a readable test-example-data/prompts.json" in capsys.readouterr().err
    flags = ["--validation_models_dirpath", str(tiny_round)]
    code, _ = _run_configure(tmp_path, tiny_round, flags=flags)
    assert code == 1 and "validation models are also training models" in capsys.readouterr().err
    flags = ["--validation_models_dirpath", str(tmp_path / "absent")]
    code, _ = _run_configure(tmp_path, None, extra=[tiny_models["qwen2"]], flags=flags)
    assert code == 1 and "--validation_models_dirpath" in capsys.readouterr().err


def test_monitor_loss_is_a_token_mean_whatever_the_batch_size(tiny_models, small_meta):
    """The monitor figure of a model is its mean over all its answer tokens: answers of
    different lengths batched two by two or one by one give the same figure."""
    texts = configure.load_texts(REPO / "learned_parameters")
    item, loaded = configure.prepare(tiny_models["llama"], small_meta, texts, 0, torch.device("cpu"))
    cut = []
    for i, e in enumerate(item.examples):  # shorten answers by 0, 1, 2, ... tokens (all fields end-aligned)
        k = min(i, len(e.answer) - 1)
        cut.append(e if k == 0 else dataclasses.replace(
            e, input_ids=e.input_ids[:-k], labels=e.labels[:-k], target_ids=e.target_ids[:-k],
            target_probs=e.target_probs[:-k],
        ))  # fmt: skip
    item.examples = cut
    assert len({len(e.answer) for e in cut}) > 1

    class Pool:
        def get(self, model_dir):
            return loaded

    bank = random_bank(small_meta, seed=5, scale=0.05)
    figures = [
        configure.monitor_losses(bank, [item], Pool(), dataclasses.replace(small_meta, train_batch_size=b), "cpu")
        for b in (1, 2, len(cut))
    ]
    values = [f[item.model_dir.name] for f in figures]
    assert (
        values[0] > 0
        and values[1] == pytest.approx(values[0], rel=1e-5)
        and values[2] == pytest.approx(values[0], rel=1e-5)
    )
