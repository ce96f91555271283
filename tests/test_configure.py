import json

import pytest
import torch
from safetensors.torch import load_file

from telelora import cli, configure, learned, metaparameters
from telelora.adapters import Adapter, applied
from telelora.errors import TeleLoRAError

from .conftest import REPO, random_bank, write_meta


def test_three_phase_gradient_equals_end_to_end_autograd(tiny_models, small_meta):
    texts = configure.load_texts(REPO / "learned_parameters")
    item = configure.prepare(tiny_models["phi3"], small_meta, texts, seed=0)
    batch = item.examples[:2]
    bank = random_bank(small_meta, seed=4, scale=0.05)

    configure.train_step(bank, item, batch, small_meta, torch.device("cpu"))
    three_phase = {n: None if p.grad is None else p.grad.clone() for n, p in bank.named_parameters()}

    bank.zero_grad()
    adapters = {
        layer.name: Adapter(
            *bank(layer.projection_type, item.reference_activations[layer.name], layer.depth, small_meta.rank)
        )
        for layer in item.layers
    }
    inputs = configure.alignment.collate(batch, configure.pad_id(item.tokenizer), torch.device("cpu"))
    with applied(item.layers, adapters):
        item.model(**inputs).loss.backward()
    for name, p in bank.named_parameters():
        if three_phase[name] is None:  # phi3 has no k, v or up layers
            assert p.grad is None and name.split(".")[1] in ("k", "v", "up"), name
        else:
            assert torch.allclose(p.grad, three_phase[name], rtol=1e-4, atol=1e-7), name
    assert sum(g.abs().sum() for g in three_phase.values() if g is not None) > 0


def _run_configure(tmp_path, models_dir, extra=(), out=None, **meta_overrides):
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
    return cli.main(argv), out


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
    assert (tmp_path / "scratch" / "configure_losses.json").is_file()
    assert (out / "texts.json").read_bytes() == (REPO / "learned_parameters" / "texts.json").read_bytes()


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
    assert code == 1 and "no model folders to train on" in capsys.readouterr().err
    assert not (out / "generators.json").exists()
    code, _ = _run_configure(tmp_path, None, extra=[tiny_models["gpt2"]])
    assert code == 1 and "none of the training model folders could be used" in capsys.readouterr().err
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
