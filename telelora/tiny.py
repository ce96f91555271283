"""Tiny random-initialised models of every supported architecture, built offline in seconds.

They exercise the whole pipeline (tests, the README's first command, CI) with real
Hugging Face classes and a real BPE tokenizer trained on the shipped texts, laid out like
a NIST model folder (``config.json``, safetensors, tokenizer, ``round_config.json`` and its
copy ``reduced-config.json``). Their weights are random, so what they say is noise.

    python -m telelora.tiny --arch llama --out /tmp/tiny-llama
    python -m telelora.tiny --arch all --out /tmp/tiny-models    # one sub-folder per architecture
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


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the shipped texts, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = load_texts(REPO_ROOT / "learned_parameters")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts.reference + texts.alignment, trainer=trainer)
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
