"""The NIST ``mitigate`` command line, end to end on tiny models, and every bad-input path."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from telelora import cli, generated, mitigate, modelio

from .conftest import REPO, write_meta

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _nist_args(model, output, meta_file, learned_dir, tmp_path, *extra):
    return [
        "mitigate",
        "--metaparameters_filepath",
        str(meta_file),
        "--schema_filepath",
        str(REPO / "metaparameters_schema.json"),
        "--model",
        str(model),
        "--output_dirpath",
        str(output),
        "--scratch_dirpath",
        str(tmp_path / "scratch"),
        "--batch_size",
        "1",
        "--learned_parameters_dirpath",
        str(learned_dir),
        *extra,
    ]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3", "mistral", "qwen2", "gemma3"])
def test_nist_command_leaves_a_loadable_mitigated_model(tmp_path, model_copy, meta_file, learned_dir, arch):
    model_dir = model_copy(arch)
    before = _digest(model_dir)
    output = model_dir / "output"  # NIST writes inside the model folder
    code = cli.main(
        _nist_args(
            model_dir,
            output,
            meta_file,
            learned_dir,
            tmp_path,
            "--round_training_dataset_dirpath",
            str(tmp_path),
            "--peft_dirpath",
            str(tmp_path / "peft"),
        )
    )
    assert code == 0
    assert _digest(model_dir) == before  # input untouched
    report = json.loads((output / mitigate.REPORT_FILE).read_text())
    assert report["mitigated"] and report["model_architecture"] == f"telelora-tiny/{arch}"

    mitigated = AutoModelForCausalLM.from_pretrained(output)
    AutoTokenizer.from_pretrained(output)
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    out_logits = mitigated(IDS).logits
    assert (out_logits - original(IDS).logits).abs().max() > 1e-3  # the adapters did something
    with_peft = PeftModel.from_pretrained(original, str(tmp_path / "peft"))
    assert (with_peft(IDS).logits - out_logits).abs().max() < 1e-4


def test_multi_step_mitigation_is_deterministic(tmp_path, model_copy, learned_dir):
    meta = write_meta(tmp_path / "m.json", mitigation_steps=3, step_size=0.3, activation_tokens="random")
    model_dir = model_copy("llama")
    outputs = []
    for run in ("a", "b"):
        assert (
            cli.main(
                _nist_args(
                    model_dir,
                    tmp_path / run,
                    meta,
                    learned_dir,
                    tmp_path,
                    "--peft_dirpath",
                    str(tmp_path / f"peft-{run}"),
                )
            )
            == 0
        )
        outputs.append(_digest(tmp_path / run)["model.safetensors"])
    assert outputs[0] == outputs[1]
    rank = json.loads((tmp_path / "peft-a" / "adapter_config.json").read_text())["r"]
    assert rank == 3 * 4


def test_model_filepath_alias_file_inside_folder_and_unknown_flags(tmp_path, model_copy, meta_file, learned_dir):
    model_dir = model_copy("llama")
    args = _nist_args(model_dir, tmp_path / "out", meta_file, learned_dir, tmp_path, "--future_flag", "x", "--flag2")
    args[args.index("--model")] = "--model_filepath"
    args[args.index(str(model_dir))] = str(model_dir / "model.safetensors")
    assert cli.main(args) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_existing_output_folder_is_replaced(tmp_path, model_copy, meta_file, learned_dir):
    model_dir = model_copy("llama")
    output = tmp_path / "out"
    output.mkdir()
    (output / "stale.txt").write_text("old")
    assert cli.main(_nist_args(model_dir, output, meta_file, learned_dir, tmp_path)) == 0
    assert not (output / "stale.txt").exists() and (output / "config.json").is_file()


def test_unknown_architecture_saves_the_unchanged_model(tmp_path, model_copy, meta_file, learned_dir, capsys):
    model_dir = model_copy("gpt2")
    output = tmp_path / "out"
    assert cli.main(_nist_args(model_dir, output, meta_file, learned_dir, tmp_path)) == 0
    err = capsys.readouterr().err
    assert "UNCHANGED model was saved" in err and "no decoder block list" in err
    report = json.loads((output / mitigate.REPORT_FILE).read_text())
    assert not report["mitigated"]
    assert _digest(output) == {**_digest(model_dir), mitigate.REPORT_FILE: _digest(output)[mitigate.REPORT_FILE]}
    AutoModelForCausalLM.from_pretrained(output)
    AutoTokenizer.from_pretrained(output)
    assert cli.main(_nist_args(model_dir, tmp_path / "o2", meta_file, learned_dir, tmp_path, "--fail_on_fallback")) == 3


def test_missing_learned_parameters_fall_back_to_the_unchanged_model(tmp_path, model_copy, meta_file, capsys):
    model_dir = model_copy("llama")
    assert cli.main(_nist_args(model_dir, tmp_path / "out", meta_file, tmp_path / "nothing", tmp_path)) == 0
    assert "run entrypoint.py configure" in capsys.readouterr().err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def _corrupt(folder):
    (folder / "model.safetensors").write_bytes(b"\x00\x01garbage" * 10)


def _no_config(folder):
    (folder / "config.json").unlink()


def _no_tokenizer(folder):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink()


def _broken_tokenizer(folder):
    (folder / "tokenizer.json").write_text("{broken")


def _no_weights(folder):
    (folder / "model.safetensors").unlink()


@pytest.mark.parametrize(
    "breakage, message",
    [
        (_no_config, "has no config.json"),
        (_corrupt, "is not a readable safetensors file"),
        (_no_weights, "holds no model.safetensors"),
        (_no_tokenizer, "has no tokenizer"),
        (_broken_tokenizer, "the tokenizer does not load"),
    ],
)
def test_bad_model_folders_get_one_clear_line(tmp_path, model_copy, meta_file, learned_dir, capsys, breakage, message):
    model_dir = model_copy("llama")
    breakage(model_dir)
    code = cli.main(_nist_args(model_dir, tmp_path / "out", meta_file, learned_dir, tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "out").exists()


def test_missing_model_folder(tmp_path, meta_file, learned_dir, capsys):
    assert cli.main(_nist_args(tmp_path / "absent", tmp_path / "out", meta_file, learned_dir, tmp_path)) == 1
    assert "model folder" in capsys.readouterr().err


def test_bad_metaparameters_exit_2(tmp_path, model_copy, learned_dir, capsys):
    meta = write_meta(tmp_path / "m.json", num_reference_texts=1)
    assert cli.main(_nist_args(model_copy("llama"), tmp_path / "out", meta, learned_dir, tmp_path)) == 2
    assert "key 'num_reference_texts' has value 1; allowed range [2, 512]" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder_as_user(tmp_path, model_copy, meta_file, learned_dir, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert cli.main(_nist_args(model_copy("llama"), locked / "out", meta_file, learned_dir, tmp_path)) == 1
    assert "cannot be written" in capsys.readouterr().err


def test_unwritable_output_folder(tmp_path, model_copy, meta_file, learned_dir, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert cli.main(_nist_args(model_copy("llama"), blocker / "out", meta_file, learned_dir, tmp_path)) == 1
    assert "cannot be written" in capsys.readouterr().err


def test_entrypoint_script_runs_as_the_harness_calls_it(tmp_path, model_copy, meta_file, learned_dir):
    model_dir = model_copy("phi3")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "entrypoint.py"),
            *_nist_args(model_dir, model_dir / "output", meta_file, learned_dir, tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (model_dir / "output" / "model.safetensors").is_file()


def test_shipped_learned_parameters_change_a_tiny_model(tmp_path, model_copy):
    """The shipped generators and metaparameters work together and are not the identity."""
    model_dir = model_copy("gemma2")
    assert cli.main(["mitigate", "--model", str(model_dir), "--output_dirpath", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / mitigate.REPORT_FILE).read_text())
    assert report["mitigated"] and set(report["seconds"]) == {"copy_input", "load", "mitigate", "save"}
    original, mitigated = (AutoModelForCausalLM.from_pretrained(p) for p in (model_dir, tmp_path / "out"))
    assert (original(IDS).logits - mitigated(IDS).logits).abs().max() > 1e-4


def test_a_report_that_cannot_be_rewritten_after_the_save_costs_only_its_timing(tmp_path, model_copy, monkeypatch):
    def full_disk(path, text):
        raise OSError("No space left on device")

    model_dir = model_copy("llama")
    monkeypatch.setattr(mitigate, "atomic_write_text", full_disk)
    assert cli.main(["mitigate", "--model", str(model_dir), "--output_dirpath", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / mitigate.REPORT_FILE).read_text())
    assert report["mitigated"] and "save" not in report["seconds"]  # the report the save wrote
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("where", ["same", "parent"])
def test_output_folder_that_would_replace_the_input_is_refused(
    tmp_path, model_copy, meta_file, learned_dir, where, capsys
):
    model_dir = model_copy("llama")
    output = model_dir if where == "same" else model_dir.parent
    before = _digest(model_dir)
    assert cli.main(_nist_args(model_dir, output, meta_file, learned_dir, tmp_path)) == 1
    assert "would replace" in capsys.readouterr().err
    assert _digest(model_dir) == before


def _fail(error):
    def raiser(*args, **kwargs):
        raise error

    return raiser


def _disk_full_after_a_partial_shard(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\x00" * 100)  # half-written, as a full disk leaves it
    raise OSError(28, "No space left on device")


FAULTS = {
    "gpu out of memory while loading": (
        lambda mp: mp.setattr(
            "transformers.AutoModelForCausalLM.from_pretrained",
            _fail(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
        ),
        "CUDA out of memory",
    ),
    "cuda error while loading": (
        lambda mp: mp.setattr(
            "transformers.AutoModelForCausalLM.from_pretrained", _fail(RuntimeError("CUDA error: an illegal access"))
        ),
        "CUDA error",
    ),
    "host out of memory while mitigating": (
        lambda mp: mp.setattr(generated, "plan_mitigation", _fail(MemoryError("cannot allocate"))),
        "MemoryError",
    ),
    "error while mitigating": (
        lambda mp: mp.setattr(generated.guard, "fit_scale", _fail(RuntimeError("guard exploded"))),
        "guard exploded",
    ),
    "disk full while saving": (
        lambda mp: mp.setattr(modelio, "save_file", _disk_full_after_a_partial_shard),
        "No space left on device",
    ),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_every_failure_after_the_checks_leaves_the_input_model(
    tmp_path, round_like_models, meta_file, learned_dir, monkeypatch, capsys, fault
):
    inject, message = FAULTS[fault]
    model_dir = Path(shutil.copytree(round_like_models["llama3.1"], tmp_path / "model"))
    output = model_dir / "output"
    inject(monkeypatch)
    assert cli.main(_nist_args(model_dir, output, meta_file, learned_dir, tmp_path)) == 0
    err = capsys.readouterr().err
    assert "MITIGATION FAILED" in err and "UNCHANGED model was saved" in err and message in err
    report = json.loads((output / mitigate.REPORT_FILE).read_text())
    assert not report["mitigated"] and message in report["reason"]
    assert _digest(output) == {**_digest(model_dir), mitigate.REPORT_FILE: _digest(output)[mitigate.REPORT_FILE]}
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".")]  # no staging left behind
    flagged = _nist_args(model_dir, tmp_path / "o2", meta_file, learned_dir, tmp_path, "--fail_on_fallback")
    assert cli.main(flagged) == 3 and (tmp_path / "o2" / "model.safetensors.index.json").is_file()
    monkeypatch.undo()
    AutoModelForCausalLM.from_pretrained(output)
    AutoTokenizer.from_pretrained(output)


def test_a_killed_run_leaves_the_input_model(tmp_path, model_copy, meta_file, learned_dir):
    """The input's files are in the output before loading starts: SIGKILL (the out-of-memory
    killer, a harness timeout) mid-mitigation still leaves a loadable model."""
    model_dir = model_copy("llama")
    output = model_dir / "output"
    args = _nist_args(model_dir, output, meta_file, learned_dir, tmp_path)
    script = (
        "import os, signal, sys\n"
        "from telelora import cli, generated\n"
        "generated.plan_mitigation = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"sys.exit(cli.main({args!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    report = json.loads((output / mitigate.REPORT_FILE).read_text())
    assert not report["mitigated"] and report["reason"].startswith("unfinished")
    assert _digest(output) == {**_digest(model_dir), mitigate.REPORT_FILE: _digest(output)[mitigate.REPORT_FILE]}
    AutoModelForCausalLM.from_pretrained(output)
    AutoTokenizer.from_pretrained(output)


def test_report_says_what_the_guard_did(tmp_path, model_copy, learned_dir):
    meta = write_meta(tmp_path / "m.json", guard_min_agreement=0.99, guard_prompts=3, guard_layer_factor=1.0)
    model_dir = model_copy("qwen2")
    assert cli.main(_nist_args(model_dir, tmp_path / "out", meta, learned_dir, tmp_path)) == 0
    report = json.loads((tmp_path / "out" / mitigate.REPORT_FILE).read_text())
    assert report["mitigated"] and report["device"] == "cpu" and report["compute_dtype"] == "float32"
    assert not report["layer_bound"]["applied"] and "no layer ranges" in report["layer_bound"]["reason"]
    drift = report["drift_guard"]
    assert drift["applied"] and drift["prompts"] == 3 and drift["min_agreement"] == 0.99
    assert drift["agreement"] >= 0.99 and drift["scale"] < 1.0  # the random test generators drift far
