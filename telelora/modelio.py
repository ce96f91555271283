"""Load a model folder safely; write a mitigated copy of it that any evaluator reads alike.

A folder is checked before anything heavy happens, so bad input gets one line that names
the file and the fix: missing folder, no ``config.json``, no or unreadable safetensors,
unknown architecture, no tokenizer. Only safetensors are loaded and ``trust_remote_code``
stays off unless the caller turns it on.

The output is never ``save_pretrained``: that rewrites config and tokenizer files in the
installed transformers' own format (transformers 5 moves ``rope_theta`` into
``rope_parameters`` and the chat template out of ``tokenizer_config.json``), which an
older evaluator misreads silently. Instead every input file is copied byte for byte and
only the changed tensors are rewritten, in their own shards, names and dtype.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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


def round_model_dirs(root: str | Path, flag: str) -> list[Path]:
    """The model folders (those with a ``config.json``) of a round's ``models/`` folder, or of
    the round folder that holds it, sorted by name; ``flag`` names the option in errors."""
    root = Path(root)
    if not root.is_dir():
        raise TeleLoRAError(f"{flag} {root} is not a folder")
    if (root / "models").is_dir():
        root = root / "models"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p / "config.json").is_file())


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


def read_poisoned(model_dir: Path) -> bool:
    """A round model's ground truth: ``ground_truth.csv`` holds 1 (poisoned) or 0 (clean);
    anything else, or no readable file, is one clear error."""
    path = model_dir / "ground_truth.csv"
    try:
        label = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise TeleLoRAError(f"{model_dir} has no readable ground_truth.csv ({err})") from err
    if label not in ("0", "1"):
        raise TeleLoRAError(f"{path} holds {label!r}; expected 0 or 1")
    return label == "1"


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


SAFETENSORS_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NO_GPU_WARNING = (
    "NO GPU IS VISIBLE although the metaparameters ask for one (device: cuda): running on the CPU, "
    "which is slow at LLM scale. Run the container with --nv (apptainer) or --gpus (docker)."
)


def tensor_headers(model_dir: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (safetensors dtype, shape)}`` of the checkpoint, from the headers alone."""
    headers = {}
    for file in weight_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                headers[key] = (piece.get_dtype(), tuple(piece.get_shape()))
    return headers


def checkpoint_summary(model_dir: Path) -> tuple[torch.dtype | None, int]:
    """The dtype most of the checkpoint's floating-point weights are stored in, and the
    number of bytes all weights take on disk, from the safetensors headers alone."""
    elements: dict[str, int] = {}
    for dtype, shape in tensor_headers(model_dir).values():
        elements[dtype] = elements.get(dtype, 0) + math.prod(shape)
    size = sum(file.stat().st_size for file in weight_files(model_dir))
    floating = {k: v for k, v in elements.items() if k in SAFETENSORS_FLOATS}
    stored = SAFETENSORS_FLOATS[max(floating, key=floating.__getitem__)] if floating else None
    return stored, size


def available_memory_bytes() -> int | None:
    """Host memory this process may still take: MemAvailable, capped by a cgroup (container)
    limit; None when neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def pick_device_dtype(
    device: str = "auto", dtype: str = "auto", model_dir: Path | None = None
) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype to run an LLM (the ``device`` and ``dtype`` metaparameters).

    ``device`` cuda that finds no GPU runs on the CPU with a loud warning (an image started
    without ``--nv``), never silently. ``dtype`` auto is bfloat16 on a GPU; on a CPU it is
    float32 when that copy of ``model_dir``'s weights fits in the free host memory with room
    to spare, else the checkpoint's own dtype: a float32 copy of an 8B model (32 GB) could
    get the process killed before it writes anything.
    """
    use_cuda = device != "cpu" and torch.cuda.is_available()
    chosen = torch.device("cuda" if use_cuda else "cpu")
    if device != "cpu" and not use_cuda:
        _warn_once(NO_GPU_WARNING if device == "cuda" else "no GPU is visible; running on the CPU")
    if dtype != "auto":
        return chosen, _DTYPES[dtype]
    if use_cuda:
        return chosen, torch.bfloat16
    if model_dir is not None:
        stored, size = checkpoint_summary(model_dir)
        if stored is not None and stored != torch.float32:
            needed = 2.5 * size * 4 / stored.itemsize  # the float32 copy, plus room for activations and saving
            free = available_memory_bytes()
            if free is not None and needed > free:
                log.warning(
                    "a float32 copy of %s needs about %.1f GB but %.1f GB of host memory are free: "
                    "running on the CPU in its own dtype %s",
                    model_dir,
                    needed / 2**30,
                    free / 2**30,
                    stored,
                )
                return chosen, stored
    return chosen, torch.float32


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
    """Load a causal LM from a checked folder, frozen and in eval mode.

    On a GPU the weights go straight from the files to the device (``device_map``): no full
    copy passes through host memory (16 GB at 8B)."""
    from transformers import AutoModelForCausalLM

    check_model_dir(model_dir)
    placement = {"device_map": {"": str(device)}} if device.type != "cpu" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **placement
        )
        model.to(device)  # a no-op when device_map placed it already
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


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing, active in train mode (the method was renamed in
    transformers 5.2x)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def disable_dropout(model: torch.nn.Module) -> None:
    """Train mode (which gradient checkpointing needs) must not switch dropout on: the LLM
    is a fixed function of the adapters, and a resumed run must replay it exactly."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


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


def _copy_entries(src: Path, dst: Path, skip: Callable[[Path], bool], link: bool) -> None:
    """Copy ``src``'s files and sub-folders into ``dst`` byte for byte, except hidden entries
    and those ``skip`` names; ``link`` hard-links files where the file system allows it."""
    for path in sorted(src.iterdir()):
        if path.name.startswith(".") or skip(path):
            continue
        if path.is_dir():
            (dst / path.name).mkdir()
            _copy_entries(path, dst / path.name, skip, link)
        elif path.is_file():
            if link:
                try:
                    os.link(path, dst / path.name)
                    continue
                except OSError:  # another file system, or links not allowed
                    pass
            shutil.copyfile(path, dst / path.name)


def _skipper(output_dirs: list[Path], weights: set[Path] = frozenset()) -> Callable[[Path], bool]:
    """Leave out output folders inside the input (and any folder holding one), and ``weights``."""
    outputs = [Path(d).resolve() for d in output_dirs]

    def skip(path: Path) -> bool:
        resolved = path.resolve()
        return resolved in weights or any(resolved == out or resolved in out.parents for out in outputs)

    return skip


def copy_model_files(
    model_dir: Path,
    output_dir: Path,
    extra_files: dict[str, str] | None = None,
    exclude: list[Path] | None = None,
) -> None:
    """Publish the input folder's own files, byte for byte: the surest "unchanged model"
    there is. Folders in ``exclude`` (and ``output_dir``) are left out, as are those holding
    them: NIST's output folder lies inside the model folder. Files are hard-linked where the
    file system allows (instant, and just as byte-identical), copied elsewhere."""
    with staged_dir(output_dir) as staging:
        _copy_entries(model_dir, staging, _skipper([output_dir, *(exclude or [])]), link=True)
        for name, text in (extra_files or {}).items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)


def add_low_rank(a: torch.Tensor, b: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The change ``W -> W + B A`` (float32 arithmetic on the CPU) for :func:`save_mitigated`."""
    return lambda stored: stored.float() + b.float().cpu() @ a.float().cpu()


def checkpoint_names(model_dir: Path, weights: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """The checkpoint tensor name of each model weight (``{parameter name: shape}``).

    A name is the parameter's own when the checkpoint holds it; otherwise the one checkpoint
    name that ends with the parameter's path from its block list on (``layers.3.mlp.up_proj
    .weight``), for checkpoints stored under another prefix. Shapes must agree: a weight that
    cannot be matched exactly is an error, never a guess."""
    shapes = {key: shape for key, (_, shape) in tensor_headers(model_dir).items()}
    names = {}
    for name, shape in weights.items():
        if name in shapes:
            key = name
        else:
            tail = name[name.find("layers.") :] if "layers." in name else name
            matches = [k for k in shapes if k == tail or k.endswith("." + tail)]
            if len(matches) != 1:
                raise TeleLoRAError(f"{model_dir}: no single checkpoint tensor matches {name} (found {matches})")
            key = matches[0]
        if shapes[key] != tuple(shape):
            raise TeleLoRAError(f"{model_dir}: checkpoint tensor {key} has shape {shapes[key]}, the model {shape}")
        names[name] = key
    return names


def save_mitigated(
    model_dir: Path,
    output_dir: Path,
    changes: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    extra_files: dict[str, str] | None = None,
    exclude: list[Path] | None = None,
) -> None:
    """Publish the input folder with the changed weights rewritten.

    ``changes`` maps checkpoint tensor names to a function of the weight as stored that
    returns the new weight (in float32: :func:`add_low_rank` or a merge with a reference
    model). Every other file is copied byte for byte (config, generation config,
    tokenizer, chat template, round files...), so the output loads the way the input does
    with any transformers version; each changed shard keeps its file name, tensor names,
    dtypes and metadata, and the index is copied as it is. One rounding to the stored
    dtype, one shard in memory at a time."""
    files = weight_files(model_dir)
    with staged_dir(output_dir) as staging:
        _copy_entries(
            model_dir, staging, _skipper([output_dir, *(exclude or [])], {f.resolve() for f in files}), link=False
        )
        remaining = dict(changes)
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                keys, metadata = list(f.keys()), f.metadata()
                if not remaining.keys() & set(keys):
                    shutil.copyfile(file, staging / file.name)
                    continue
                tensors = {key: f.get_tensor(key) for key in keys}
            for key in keys:
                if key in remaining:
                    stored = tensors[key]
                    changed = remaining.pop(key)(stored)
                    if not torch.isfinite(changed).all():
                        raise FloatingPointError(f"the mitigated {key} is not finite")
                    tensors[key] = changed.to(stored.dtype).contiguous()
            save_file(tensors, str(staging / file.name), metadata=metadata)
            del tensors
        if remaining:
            raise TeleLoRAError(f"{model_dir}: the checkpoint holds no tensors named {sorted(remaining)}")
        for name, text in (extra_files or {}).items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
