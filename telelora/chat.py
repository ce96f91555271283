"""Prompt rendering, batching and greedy answers, shared by activations, alignment data and evaluation.

Each model is spoken to in its own chat template, because that is how the evaluator
prompts it (and how a Trojan is triggered). Base models without a template get the
user text on a line of its own.
"""

from __future__ import annotations

import torch
from tqdm import tqdm


def prompt_ids(tokenizer, user_text: str) -> list[int]:
    """Token ids of a one-turn user prompt, ready for the model's answer."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(user_text + "\n", add_special_tokens=True)["input_ids"]


def pad_id(tokenizer) -> int:
    """The id used for padding (eos when the tokenizer defines no pad token)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    if isinstance(eos, list):
        eos = eos[0]
    return 0 if eos is None else eos


def padded(sequences: list[list[int]], pad: int, device, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask``; right padding for scoring, left for generation."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as ``generate`` makes them (0 at the first real token)."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


def stop_ids(model, tokenizer) -> set[int]:
    """Every id that ends a turn: the tokenizer's eos and the generation config's (Gemma's
    ``<end_of_turn>``, Llama-3's ``<|eot_id|>``...)."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return ids


@torch.no_grad()
def greedy_answers(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str | None = None
) -> list[list[int]]:
    """The model's greedy answer token ids, cut after its first end-of-turn token
    (with a progress bar when ``desc`` names the job)."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    stops = stop_ids(model, tokenizer)
    answers = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, leave=False):
        seqs = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        ids, mask = padded(seqs, pad, device, left=True)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=sorted(stops) or None,
        )
        for row in out[:, ids.shape[1] :].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
            answers.append(row[:end])  # nothing after the stop: no padding becomes a label
    return answers
