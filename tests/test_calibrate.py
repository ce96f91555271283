"""Calibration of the drift guard's layer ranges for learned parameters that lack them."""

import json

import pytest
import torch

from telelora import calibrate, guard, learned, modelio
from telelora.architectures import find_adapted_layers
from telelora.generated import generate_adapters
from telelora.texts import load as load_texts

from .conftest import REPO, random_bank

CPU = torch.device("cpu")


def test_calibration_command_records_ranges(tmp_path, tiny_models, small_meta, meta_file):
    out = tmp_path / "learned"
    learned.write(random_bank(small_meta), {"note": "test"}, REPO / "learned_parameters", out)
    model_dir = tiny_models["llama"]
    calibrate.main([str(out), str(model_dir), "--metaparameters_filepath", str(meta_file)])
    info = json.loads((out / learned.INFO_FILE).read_text())
    model = modelio.load_model(model_dir, CPU, torch.float32)
    layers = find_adapted_layers(model, small_meta.target_projections)
    bank, _ = learned.load_bank(out, small_meta)
    reference = load_texts(out).reference[: small_meta.num_reference_texts]
    tok = modelio.load_tokenizer(model_dir)
    adapters = generate_adapters(bank, model, tok, layers, reference, small_meta, small_meta.seed)
    expected = guard.layer_ranges([(x.projection_type, guard.spectral_norm(adapters[x.name])) for x in layers])
    assert info["layer_ranges"] == pytest.approx(expected, rel=1e-6)
    assert info["layer_ranges_from"] == [{"model": "llama", "model_architecture": "telelora-tiny/llama"}]


def test_calibration_bad_input_gets_one_line(tmp_path, tiny_models, small_meta, meta_file):
    out = tmp_path / "learned"
    learned.write(random_bank(small_meta), {"note": "test"}, REPO / "learned_parameters", out)
    before = (out / learned.INFO_FILE).read_text()
    for argv, message in (
        ([str(out), str(tmp_path / "absent")], "does not exist"),
        ([str(tmp_path / "nothing"), str(tiny_models["llama"])], "holds no trained generators"),
    ):
        with pytest.raises(SystemExit, match=message):
            calibrate.main([*argv, "--metaparameters_filepath", str(meta_file)])
    assert (out / learned.INFO_FILE).read_text() == before  # nothing written
