"""``learned_parameters/``: generator weights, their config and provenance, and the texts.

generators.safetensors   one EinNet per projection type
generators.json          architecture config, provenance (data, steps, loss, date, metaparameters) and
                         the layer ranges: per projection type the largest ||V^T U||_2 the generators
                         gave on their training models (the drift guard's per-layer bound)
texts.json               reference texts and alignment prompts (see telelora.texts)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from telelora.errors import TeleLoRAError
from telelora.generator import GeneratorBank
from telelora.io_utils import staged_dir
from telelora.metaparameters import Metaparameters
from telelora.texts import TEXTS_FILE

WEIGHTS_FILE = "generators.safetensors"
INFO_FILE = "generators.json"
_ARCH_KEYS = ("generator_hidden", "generator_stacks", "use_depth_channel")


def load_bank(learned_dir: str | Path, meta: Metaparameters) -> tuple[GeneratorBank, dict]:
    """The trained generators, checked against the metaparameters that shape them."""
    learned_dir = Path(learned_dir)
    weights, info_path = learned_dir / WEIGHTS_FILE, learned_dir / INFO_FILE
    if not weights.is_file() or not info_path.is_file():
        raise TeleLoRAError(
            f"{learned_dir} holds no trained generators ({WEIGHTS_FILE} + {INFO_FILE}); run entrypoint.py configure"
        )
    try:
        info = json.loads(info_path.read_text())
        config = info["config"]
    except (ValueError, KeyError) as err:
        raise TeleLoRAError(f"{info_path} is malformed ({err}); re-run configure") from err
    wanted = {k: getattr(meta, k) for k in _ARCH_KEYS}
    trained = {k: config.get(k) for k in _ARCH_KEYS}
    if wanted != trained:
        raise TeleLoRAError(
            f"{info_path}: generators were trained with {trained} but the metaparameters ask for {wanted}; "
            "use matching metaparameters or run configure again"
        )
    bank = GeneratorBank(
        config["generator_hidden"], config["generator_stacks"], config["use_depth_channel"], config["projection_types"]
    )
    try:
        bank.load_state_dict(load_file(str(weights)))
    except Exception as err:
        raise TeleLoRAError(f"{weights} does not hold weights for these generators ({err}); re-run configure") from err
    bank.eval()
    return bank, info


def write(
    bank: GeneratorBank,
    provenance: dict,
    texts_source_dir: str | Path,
    out_dir: str | Path,
    layer_ranges: dict[str, float] | None = None,
) -> Path:
    """Replace ``out_dir`` atomically with the generators, their provenance, layer ranges and the texts."""
    with staged_dir(out_dir) as staging:
        state = {k: v.detach().float().cpu().contiguous() for k, v in bank.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        info = {"config": bank.config, "provenance": provenance, "layer_ranges": layer_ranges}
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2))
        shutil.copyfile(Path(texts_source_dir) / TEXTS_FILE, staging / TEXTS_FILE)
    return Path(out_dir)


def count_parameters(bank: GeneratorBank) -> int:
    return sum(p.numel() for p in bank.parameters())
