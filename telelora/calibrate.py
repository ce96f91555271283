"""Record the drift guard's layer ranges for learned parameters written before ``configure``
recorded them itself: the largest ``||V^T U||_2`` the generators give each projection type on
their own training models (``telelora.guard.bound_layers`` reads them).

    python -m telelora.calibrate learned_parameters MODEL_DIR [MODEL_DIR ...]   # their training models
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from telelora import learned, metaparameters, modelio
from telelora.architectures import find_adapted_layers
from telelora.errors import TeleLoRAError
from telelora.generated import generate_adapters
from telelora.guard import layer_ranges, spectral_norm
from telelora.io_utils import atomic_write_text
from telelora.texts import load as load_texts

log = logging.getLogger(__name__)


def calibrate(learned_dir: Path, model_dirs: list[Path], meta) -> dict[str, float]:
    """Record the layer ranges of ``learned_dir``'s generators on ``model_dirs`` (their training
    models) into its ``generators.json``, for learned parameters written before ``configure``
    recorded them itself. Returns the ranges."""
    bank, info = learned.load_bank(learned_dir, meta)
    reference = load_texts(learned_dir).reference[: meta.num_reference_texts]
    norms = []
    for model_dir in model_dirs:
        modelio.check_model_dir(modelio.resolve_model_dir(model_dir))
        device, dtype = modelio.pick_device_dtype(meta.device, meta.dtype, model_dir)
        model = modelio.load_model(model_dir, device, dtype)
        layers = find_adapted_layers(model, meta.target_projections)
        bank.to(device)
        adapters = generate_adapters(bank, model, modelio.load_tokenizer(model_dir), layers, reference, meta, meta.seed)
        norms += [
            (layer.projection_type, spectral_norm(adapters[layer.name])) for layer in layers if layer.name in adapters
        ]
        log.info("%s: %d layers measured", model_dir.name, len(layers))
        del model
    ranges = layer_ranges(norms)
    info["layer_ranges"] = ranges
    info["layer_ranges_from"] = [
        {"model": d.name, "model_architecture": modelio.round_config(d).get("model_architecture")} for d in model_dirs
    ]
    atomic_write_text(Path(learned_dir) / learned.INFO_FILE, json.dumps(info, indent=2))
    return ranges


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Record the drift guard's layer ranges of learned parameters on their training models."
    )
    parser.add_argument("learned_parameters_dirpath", type=Path)
    parser.add_argument("model_dirpaths", type=Path, nargs="+", help="the models the generators were trained on")
    parser.add_argument("--metaparameters_filepath", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        meta = metaparameters.load(args.metaparameters_filepath)
        ranges = calibrate(args.learned_parameters_dirpath, args.model_dirpaths, meta)
    except TeleLoRAError as err:
        raise SystemExit("error: " + " ".join(str(err).split())) from err
    except OSError as err:  # e.g. generators.json cannot be written
        raise SystemExit(f"error: {args.learned_parameters_dirpath}: {err}") from err
    print(json.dumps(ranges, indent=2))


if __name__ == "__main__":
    main()
