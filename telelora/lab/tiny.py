"""Tiny random-initialised models of every supported architecture, built offline in seconds.

They exercise the whole pipeline (tests, the README's first command, CI) with real
Hugging Face classes and a real BPE tokenizer trained on the shipped texts, laid out like
a NIST model folder (``config.json``, safetensors, tokenizer, ``round_config.json`` and its
copy ``reduced-config.json``). Their weights are random, so what they say is noise.

    python -m telelora.lab.tiny --arch llama --out /tmp/tiny-llama
    python -m telelora.lab.tiny --arch all --out /tmp/tiny-models    # one sub-folder per architecture
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from telelora.metaparameters import REPO_ROOT
from telelora.texts import load as load_texts

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 384

_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=3)


def _config(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=512, **_SHAPE, **_IDS)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=64)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)  # q/k/v with bias
    if arch == "gemma2":
        return tf.Gemma2Config(**common, head_dim=8, sliding_window=64)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=64)
    if arch == "phi3":
        return tf.Phi3Config(**common)  # fused qkv_proj and gate_up_proj
    if arch == "gpt2":  # unsupported on purpose: Conv1D layers named c_attn/c_fc
        return tf.GPT2Config(vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=512, **_IDS)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES + ('gpt2',)}")


ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3")


def _train_bpe(special_tokens: list[str]):
    """A byte-level BPE ``tokenizers.Tokenizer`` of VOCAB_SIZE trained on the shipped texts;
    the special tokens take the first ids, in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = load_texts(REPO_ROOT / "learned_parameters")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts.reference + texts.alignment, trainer=trainer)
    return tok


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the shipped texts, with a ChatML template."""
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build(arch: str, out_dir: str | Path, seed: int = 0, poisoned: bool = False, init_std: float | None = 0.2) -> Path:
    """Write a tiny random ``arch`` model folder to ``out_dir`` and return it.

    ``init_std`` 0.2 (larger than HF's 0.02) gives varied, non-flat logits, which tests of
    "did the adapter change the output" need; ``None`` keeps HF's initialisation, whose
    unsaturated attention is what a model needs to learn a trigger (the tiny round).
    """
    from transformers import AutoModelForCausalLM

    config = _config(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, init_std)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    build_tokenizer().save_pretrained(str(out))
    meta = {"model_architecture": f"telelora-tiny/{arch}", "poisoned": poisoned, "seed": seed}
    for name in ("round_config.json", "reduced-config.json"):
        (out / name).write_text(json.dumps(meta, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random HF model folder.")
    parser.add_argument("--arch", default="llama", choices=ARCHITECTURES + ("gpt2", "all"))
    parser.add_argument("--out", required=True, help="model folder (with --arch all: the parent folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.arch == "all":
        for offset, arch in enumerate(ARCHITECTURES):
            print(build(arch, Path(args.out) / arch, args.seed + offset))
    else:
        print(build(args.arch, args.out, args.seed))


if __name__ == "__main__":
    main()


# --- folders laid out like the round's (transformers-4 files, bf16 shards with an index) ---

_LLAMA31_TEMPLATE = (
    '{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}'
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    '{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}{{- "Cutting Knowledge Date: December 2023\\n" }}'
    '{{- "Today Date: " + date_string + "\\n\\n" }}{{- system_message }}{{- "<|eot_id|>" }}'
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
_GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + "
    "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
_PHI35_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
_ROUND_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)

# kind -> (special tokens, tokenizer bos/eos/pad, config, generation config, chat template, HF base name)
ROUND_LIKE = {
    "llama3.1": dict(
        special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|eom_id|>"],
        tokens=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
        prepend_bos=True,
        config=dict(
            architectures=["LlamaForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=0,
            eos_token_id=[1, 5, 4], hidden_act="silu", initializer_range=0.02, max_position_embeddings=131072,
            mlp_bias=False, model_type="llama", num_key_value_heads=2, pretraining_tp=1, rms_norm_eps=1e-05,
            rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            rope_theta=500000.0, tie_word_embeddings=False, torch_dtype="bfloat16",
            transformers_version="4.43.0.dev0", use_cache=True, **_ROUND_SHAPE,
        ),
        generation=dict(bos_token_id=0, do_sample=True, eos_token_id=[1, 5, 4], temperature=0.6, top_p=0.9,
                        transformers_version="4.43.0.dev0"),
        template=_LLAMA31_TEMPLATE,
        base="meta-llama/Meta-Llama-3.1-8B-Instruct",
    ),
    "gemma2": dict(
        special=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        tokens=dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"),
        prepend_bos=True,
        config=dict(
            architectures=["Gemma2ForCausalLM"], attention_bias=False, attention_dropout=0.0,
            attn_logit_softcapping=50.0, bos_token_id=2, cache_implementation="hybrid", eos_token_id=[1, 5],
            final_logit_softcapping=30.0, head_dim=16, hidden_act="gelu_pytorch_tanh",
            hidden_activation="gelu_pytorch_tanh", initializer_range=0.02, max_position_embeddings=8192,
            model_type="gemma2", num_key_value_heads=2, pad_token_id=0, query_pre_attn_scalar=16,
            rms_norm_eps=1e-06, rope_theta=10000.0, sliding_window=4096, torch_dtype="bfloat16",
            transformers_version="4.42.4", use_cache=True, **_ROUND_SHAPE,
        ),
        generation=dict(bos_token_id=2, cache_implementation="hybrid", eos_token_id=[1, 5], pad_token_id=0,
                        transformers_version="4.42.4"),
        template=_GEMMA2_TEMPLATE,
        base="google/gemma-2-2b-it",
    ),
    "phi3.5": dict(
        special=["<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"],
        tokens=dict(bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"),
        prepend_bos=False,
        config=dict(
            architectures=["Phi3ForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=1,
            embd_pdrop=0.0, eos_token_id=3, hidden_act="silu", initializer_range=0.02,
            max_position_embeddings=131072, model_type="phi3", num_key_value_heads=4,
            original_max_position_embeddings=4096, pad_token_id=3, resid_pdrop=0.0, rms_norm_eps=1e-05,
            rope_scaling={"long_factor": [1.0, 1.1, 1.3, 1.6, 2.2, 3.5, 6.0, 12.0],
                          "short_factor": [1.0, 1.0, 1.02, 1.05, 1.1, 1.2, 1.5, 2.0], "type": "longrope"},
            rope_theta=10000.0, sliding_window=262144, tie_word_embeddings=False, torch_dtype="bfloat16",
            transformers_version="4.43.3", use_cache=True, **_ROUND_SHAPE,
        ),
        generation=dict(bos_token_id=1, eos_token_id=[6, 3, 2], pad_token_id=3, transformers_version="4.43.3"),
        template=_PHI35_TEMPLATE,
        base="microsoft/Phi-3.5-mini-instruct",
    ),
}  # fmt: skip


def _round_like_tokenizer_files(kind: str, out: Path) -> None:
    """tokenizer.json (a BPE trained on the shipped texts) and transformers-4 style
    tokenizer_config.json (chat template inside) and special_tokens_map.json."""
    from tokenizers import processors

    spec = ROUND_LIKE[kind]
    tok = _train_bpe(spec["special"])
    if spec["prepend_bos"]:
        bos = spec["tokens"]["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, t in enumerate(spec["special"])
    }  # fmt: skip
    config = {
        "added_tokens_decoder": added,
        **spec["tokens"],
        "chat_template": spec["template"],
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(spec["tokens"], indent=2) + "\n")


def build_round_like(kind: str, out_dir: str | Path, seed: int = 0, shards: int = 2) -> Path:
    """A tiny random model folder laid out like the round's models: the config,
    generation config and tokenizer files as transformers 4.4x wrote them (``rope_theta`` /
    ``rope_scaling``, ``torch_dtype``, the chat template inside ``tokenizer_config.json``),
    several eos ids, bf16 weights in ``shards`` safetensors shards with an index, and
    ``round_config.json`` naming the real base. Written by hand, not by the installed
    transformers, so it stays the old format whatever version builds it."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind not in ROUND_LIKE:
        raise ValueError(f"unknown round-like model {kind!r}; choose from {sorted(ROUND_LIKE)}")
    spec = ROUND_LIKE[kind]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {**spec["config"], "vocab_size": VOCAB_SIZE}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(spec["generation"], indent=2) + "\n")
    _round_like_tokenizer_files(kind, out)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(out)), dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings", True):
        state.pop("lm_head.weight", None)  # transformers 4 stores a tied head once
    names = sorted(state)
    per_shard = -(-len(names) // shards)
    weight_map, total = {}, 0
    for index in range(shards):
        chunk = names[index * per_shard : (index + 1) * per_shard]
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in chunk}, str(out / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in chunk})
        total += sum(state[k].numel() * state[k].element_size() for k in chunk)
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    meta = {"model_architecture": spec["base"], "poisoned": False, "seed": seed}
    for name in ("round_config.json", "reduced-config.json"):
        (out / name).write_text(json.dumps(meta, indent=2))
    return out
