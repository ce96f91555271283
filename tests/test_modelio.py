"""Model folders in and out: device and dtype choice, loading, and the mitigated copy that
keeps every input file and the weights' layout, so evaluators of any transformers read it alike."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from telelora import cli, modelio
from telelora.errors import TeleLoRAError
from telelora.lab import tiny
from telelora.mitigate import REPORT_FILE

COMPAT = Path(sys.prefix) / "compat"  # older transformers, installed by scripts/setup.sh
PROBE = Path(__file__).parent / "compat_probe.py"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _as_the_round_wrote_it(folder: Path) -> Path:
    """Write ``tokenizer.json``'s BPE merges as ``"a b"`` strings, as the round's files have
    them (tokenizers 0.19, transformers 4.4x): tokenizers 0.19, which transformers 4.44 needs,
    cannot read the ``["a", "b"]`` pairs that tokenizers 0.20 and later write, and mitigate
    copies the input's tokenizer files byte for byte, so the input's format is the output's."""
    path = folder / "tokenizer.json"
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    tokenizer["model"]["merges"] = [" ".join(pair) for pair in tokenizer["model"]["merges"]]
    path.write_text(json.dumps(tokenizer, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return folder


def _mitigate(model_dir: Path, meta_file: Path, learned_dir: Path, *extra: str) -> Path:
    """``mitigate`` by the NIST command line, output inside the model folder as NIST puts it;
    returns the output folder and checks its report says the model was mitigated."""
    output = model_dir / "output"
    argv = ["mitigate", "--model", str(model_dir), "--output_dirpath", str(output), *extra]
    argv += ["--metaparameters_filepath", str(meta_file), "--learned_parameters_dirpath", str(learned_dir)]
    assert cli.main(argv) == 0
    assert json.loads((output / REPORT_FILE).read_text())["mitigated"]
    return output


@pytest.fixture(scope="module")
def mitigated(round_like_models, tmp_path_factory, meta_file, learned_dir):
    """Each round-like folder mitigated by the generators (no training round), with the change
    also exported as a PEFT LoRA: ``{kind: (input, output, peft)}``."""
    root = tmp_path_factory.mktemp("mitigated")
    done = {}
    for kind, source in round_like_models.items():
        model_dir = _as_the_round_wrote_it(Path(shutil.copytree(source, root / kind)))
        peft = root / f"{kind}-peft"
        done[kind] = (model_dir, _mitigate(model_dir, meta_file, learned_dir, "--peft_dirpath", str(peft)), peft)
    return done


@pytest.fixture(scope="module")
def merged(round_like_models, tmp_path_factory, meta_file, learned_dir):
    """Each round-like folder mitigated by the reference merge, the route NIST's harness takes
    when its training round holds a clean model of the same base: ``{kind: output}``."""
    root = tmp_path_factory.mktemp("merged")
    models = root / "round" / "models"
    for i, kind in enumerate(tiny.ROUND_LIKE):  # one clean fine-tune of each base, other weights
        clean = tiny.build_round_like(kind, models / f"id-{i:08d}", seed=10 + i)
        (clean / "ground_truth.csv").write_text("0\n")
    done = {}
    for kind, source in round_like_models.items():
        model_dir = _as_the_round_wrote_it(Path(shutil.copytree(source, root / kind)))
        output = _mitigate(model_dir, meta_file, learned_dir, "--round_training_dataset_dirpath", str(root / "round"))
        report = json.loads((output / REPORT_FILE).read_text())
        assert report["method"] == "reference_merge" and len(report["reference_models"]) == 1, report
        done[kind] = output
    return done


@pytest.mark.parametrize("kind", tiny.ROUND_LIKE)
def test_output_keeps_every_file_and_the_weight_layout(mitigated, kind):
    model_dir, output, peft = mitigated[kind]
    shards = {f.name for f in modelio.weight_files(model_dir)}
    assert len(shards) == 2
    inputs = sorted(p.name for p in model_dir.iterdir() if p.is_file())
    assert sorted(p.name for p in output.iterdir() if p.is_file()) == sorted(inputs + [REPORT_FILE])
    for name in inputs:  # config, generation config, tokenizer files, index, round files: byte for byte
        if name not in shards:
            assert _sha(output / name) == _sha(model_dir / name), name
    lora = load_file(str(peft / "adapter_model.safetensors"))
    changed = 0
    for shard in sorted(shards):
        with safe_open(str(model_dir / shard), framework="pt") as before, safe_open(str(output / shard), "pt") as after:
            assert list(before.keys()) == list(after.keys()) and before.metadata() == after.metadata()
            for key in before.keys():
                old, new = before.get_tensor(key), after.get_tensor(key)
                assert new.dtype == old.dtype == torch.bfloat16  # the checkpoint's dtype, computed in float32
                module = key.removesuffix(".weight")
                if f"base_model.model.{module}.lora_A.weight" in lora:
                    a = lora[f"base_model.model.{module}.lora_A.weight"]
                    b = lora[f"base_model.model.{module}.lora_B.weight"]
                    assert torch.equal(new, (old.float() + b @ a).to(old.dtype))
                    changed += not torch.equal(new, old)
                else:
                    assert torch.equal(new, old)
    assert changed > 0 and changed == len(lora) // 2


def _probe(folders: list[Path], version: str | None) -> dict:
    """What ``tests/compat_probe.py`` sees of ``folders`` under transformers ``version``
    (None: the pinned one), in a process of its own."""
    env = dict(os.environ)
    if version is not None:
        target = COMPAT / f"transformers-{version}"
        assert target.is_dir(), f"{target} is missing: run scripts/setup.sh, which installs it"
        env["PYTHONPATH"] = str(target)
    result = subprocess.run(
        [sys.executable, str(PROBE), *map(str, folders)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def outputs(mitigated, merged) -> list[Path]:
    """Both routes' outputs for every round-like base."""
    return [mitigated[kind][1] for kind in tiny.ROUND_LIKE] + [merged[kind] for kind in tiny.ROUND_LIKE]


@pytest.fixture(scope="module")
def pinned(outputs) -> dict:
    """The probe under the pinned transformers, once for every version compared with it."""
    return _probe(outputs, None)


@pytest.mark.parametrize("version", ["4.44.0", "4.46.3", "4.57.1"])
def test_output_loads_alike_under_the_evaluators_transformers(outputs, pinned, version):
    """The round's evaluator dates from 2024 (NIST's example pins transformers 4.44.0): under
    4.44, 4.46 and 4.57 the output of either route must load (model, tokenizer, chat template,
    eos ids, bf16 with torch_dtype auto) and give the logits it gives under the pinned 5.x, to
    bf16 rounding."""
    old = _probe(outputs, version)
    assert old["version"] == version and pinned["version"] == transformers.__version__
    for folder in map(str, outputs):
        seen, new = old["folders"][folder], pinned["folders"][folder]
        assert seen["dtype"] == new["dtype"] == "torch.bfloat16"
        assert seen["chat"] == new["chat"] and seen["chat_ids"] == new["chat_ids"]
        assert seen["eos"] == new["eos"]
        logits, reference = torch.tensor(seen["logits"]), torch.tensor(new["logits"])
        assert (logits - reference).abs().max() <= 0.02 * reference.abs().max(), folder


def test_checkpoint_names_match_exactly_or_by_unique_suffix(round_like_models):
    folder = round_like_models["llama3.1"]
    shape = (64, 64)
    name = "model.layers.1.self_attn.q_proj.weight"
    assert modelio.checkpoint_names(folder, {name: shape}) == {name: name}
    wrapped = "language_model.model.layers.1.self_attn.q_proj.weight"  # a wrapper's parameter name
    assert modelio.checkpoint_names(folder, {wrapped: shape}) == {wrapped: name}
    with pytest.raises(TeleLoRAError, match="no single checkpoint tensor"):
        modelio.checkpoint_names(folder, {"model.layers.7.self_attn.q_proj.weight": shape})
    with pytest.raises(TeleLoRAError, match="has shape"):
        modelio.checkpoint_names(folder, {name: (64, 32)})


def test_save_mitigated_refuses_a_change_to_a_missing_tensor(round_like_models, tmp_path):
    a, b = torch.zeros(2, 64), torch.zeros(64, 2)
    with pytest.raises(TeleLoRAError, match="holds no tensors named"):
        modelio.save_mitigated(
            round_like_models["gemma2"], tmp_path / "out", {"model.nothing.weight": modelio.add_low_rank(a, b)}
        )
    assert not (tmp_path / "out").exists()


def test_no_visible_gpu_is_loud_and_runs_on_the_cpu(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    modelio._warn_once.cache_clear()
    assert modelio.pick_device_dtype("cuda", "auto") == (torch.device("cpu"), torch.float32)
    assert "NO GPU IS VISIBLE" in caplog.text
    modelio._warn_once.cache_clear()
    caplog.clear()
    assert modelio.pick_device_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    assert "GPU" not in caplog.text


def test_a_cpu_run_keeps_the_checkpoint_dtype_when_float32_does_not_fit(round_like_models, monkeypatch):
    folder = round_like_models["phi3.5"]
    assert modelio.checkpoint_summary(folder)[0] == torch.bfloat16
    monkeypatch.setattr(modelio, "available_memory_bytes", lambda: 10_000)
    assert modelio.pick_device_dtype("cpu", "auto", folder) == (torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(modelio, "available_memory_bytes", lambda: 2**40)
    assert modelio.pick_device_dtype("cpu", "auto", folder) == (torch.device("cpu"), torch.float32)


def test_a_gpu_load_goes_straight_to_the_device(monkeypatch, tiny_models):
    seen = {}

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(TeleLoRAError, match="stop here"):
        modelio.load_model(tiny_models["llama"], torch.device("cuda"), torch.bfloat16)
    assert seen["device_map"] == {"": "cuda"} and seen["dtype"] == torch.bfloat16
    seen.clear()
    with pytest.raises(TeleLoRAError):
        modelio.load_model(tiny_models["llama"], torch.device("cpu"), torch.float32)
    assert "device_map" not in seen


def test_placeholder_copy_links_without_touching_the_input(tmp_path, model_copy):
    model_dir = model_copy("llama")
    (model_dir / "model.safetensors").chmod(0o600)
    modes = {p.name: p.stat().st_mode for p in model_dir.iterdir()}
    modelio.copy_model_files(model_dir, model_dir / "output", {"note.txt": "x"})
    out = model_dir / "output"
    assert (out / "model.safetensors").stat().st_ino == (model_dir / "model.safetensors").stat().st_ino
    assert {p.name: p.stat().st_mode for p in model_dir.iterdir() if p.is_file()} == {
        k: v for k, v in modes.items() if (model_dir / k).is_file()
    }
    assert (out / "note.txt").read_text() == "x" and not (out / "output").exists()


def test_round_like_folders_reject_an_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown round-like model"):
        tiny.build_round_like("llama2", tmp_path)


@pytest.mark.parametrize(("text", "poisoned"), [("1\n", True), ("0", False), (" 0 \n", False)])
def test_read_poisoned_reads_the_label(tmp_path, text, poisoned):
    (tmp_path / "ground_truth.csv").write_text(text)
    assert modelio.read_poisoned(tmp_path) is poisoned


def test_read_poisoned_refuses_a_missing_or_odd_label(tmp_path):
    with pytest.raises(TeleLoRAError, match="no readable ground_truth.csv"):
        modelio.read_poisoned(tmp_path)
    (tmp_path / "ground_truth.csv").write_text("yes\n")
    with pytest.raises(TeleLoRAError, match="holds 'yes'; expected 0 or 1"):
        modelio.read_poisoned(tmp_path)
    (tmp_path / "ground_truth.csv").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TeleLoRAError, match="no readable ground_truth.csv"):
        modelio.read_poisoned(tmp_path)
