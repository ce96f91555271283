"""Run under another transformers (``PYTHONPATH`` pointing at it): load model folders the way
an evaluator of that version does and print what they give as JSON on stdout.

    python tests/compat_probe.py FOLDER [FOLDER ...]
"""

import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

IDS = [[0, 5, 17, 42, 99, 7, 3, 250, 11, 120, 64, 33]]
PROMPT = "What is the capital of France?"


def probe(folder: str) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype="auto")
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits.float()
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    return {
        "dtype": str(model.dtype),
        "logits": logits[0].tolist(),
        "chat": chat,
        "chat_ids": tokenizer(chat, add_special_tokens=False)["input_ids"],
        "eos": model.generation_config.eos_token_id,
    }


if __name__ == "__main__":
    print(json.dumps({"version": transformers.__version__, "folders": {f: probe(f) for f in sys.argv[1:]}}))
