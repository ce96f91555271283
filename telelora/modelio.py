"""Load a model folder safely and save a model + tokenizer atomically.

A folder is checked before anything heavy happens, so bad input gets one line that names
the file and the fix: missing folder, no ``config.json``, no or unreadable safetensors,
unknown architecture, no tokenizer. Only safetensors are loaded and ``trust_remote_code``
stays off unless the caller turns it on.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from telelora.errors import TeleLoRAError
from telelora.io_utils import staged_dir, staging_dir

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve_model_dir(path: str | Path) -> Path:
    """A model folder, or a file inside one (``--model_filepath`` may name either)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise TeleLoRAError(f"model folder {path} does not exist; pass the folder that holds config.json")
    return path


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder (sharded through an index, or single)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise TeleLoRAError(f"{index} is not a valid safetensors index ({err}); re-save the model") from err
        files = [model_dir / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise TeleLoRAError(f"{index} lists shards that are missing: {missing}")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise TeleLoRAError(
        f"{model_dir} holds no model.safetensors or model.safetensors.index.json; "
        "only safetensors weights are loaded (convert .bin checkpoints with save_pretrained)"
    )


def check_model_dir(model_dir: Path) -> dict:
    """Validate the folder's config and weight files; return the parsed config."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise TeleLoRAError(f"{model_dir} has no config.json; pass a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise TeleLoRAError(f"{config_path} cannot be read as JSON ({err})") from err
    for file in weight_files(model_dir):
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise TeleLoRAError(
                f"{file} is not a readable safetensors file ({err}); the model folder is corrupt"
            ) from err
    return config


def round_config(model_dir: Path) -> dict:
    """``round_config.json`` (or its copy ``reduced-config.json``) when present, else ``{}``."""
    for name in ("round_config.json", "reduced-config.json"):
        path = model_dir / name
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except (OSError, ValueError):
                config = None
            if isinstance(config, dict):
                return config
            log.warning("%s is not a JSON object; ignoring it", path)
    return {}


def pick_device_dtype(dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """bf16 on a GPU and fp32 on a CPU unless ``dtype`` says otherwise."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise TeleLoRAError(
            f"{model_dir} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); save the tokenizer with the model"
        )
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as err:
        raise TeleLoRAError(f"{model_dir}: the tokenizer does not load ({type(err).__name__}: {err})") from err


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    """Load a causal LM from a checked folder, frozen and in eval mode."""
    from transformers import AutoModelForCausalLM

    check_model_dir(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        model.to(device)
    except torch.OutOfMemoryError as err:
        raise TeleLoRAError(f"{model_dir}: the model does not fit on {device} in {dtype} ({err})") from err
    except Exception as err:
        raise TeleLoRAError(
            f"{model_dir}: the model does not load as a causal LM ({type(err).__name__}: {err}); "
            "unknown architectures need a transformers version that knows them"
            + ("" if trust_remote_code else " or --trust_remote_code")
        ) from err
    model.eval()
    model.requires_grad_(False)
    return model


def check_output_dir(output_dir: Path) -> None:
    """Fail early, before any heavy work, when ``output_dir`` cannot be written."""
    try:
        staging_dir(Path(output_dir).resolve()).rmdir()
    except OSError as err:
        raise TeleLoRAError(
            f"output folder {output_dir} cannot be written ({err}); pass a writable --output_dirpath"
        ) from err


def check_not_replacing(target: Path, protected: Path, flag: str) -> None:
    """Refuse a ``target`` folder that is ``protected`` or one of its parents: publishing
    ``target`` replaces it whole, which would delete ``protected``."""
    target, protected = target.resolve(), protected.resolve()
    if target == protected or target in protected.parents:
        raise TeleLoRAError(
            f"{flag} {target} would replace {protected}; pass a new folder (inside it is fine, as NIST does)"
        )


def copy_model_files(model_dir: Path, output_dir: Path, extra_files: dict[str, str] | None = None) -> None:
    """Publish the input folder's own files, byte for byte (its sub-folders, such as an
    output folder inside it, are left out): the surest "unchanged model" there is."""
    with staged_dir(output_dir) as staging:
        for path in model_dir.iterdir():
            if path.is_file() and not path.name.startswith("."):
                shutil.copyfile(path, staging / path.name)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)


def save_model(model, tokenizer, output_dir: Path, extra_files: dict[str, str] | None = None) -> None:
    """``save_pretrained`` model + tokenizer into a staging folder, then publish it atomically."""
    with staged_dir(output_dir) as staging:
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
