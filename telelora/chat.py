"""Prompt rendering, batching and greedy answers, shared by activations, alignment data and evaluation.

Each model is spoken to in its own chat template, because that is how the evaluator
prompts it (and how a Trojan is triggered). Base models without a template get the
user text on a line of its own.
"""

from __future__ import annotations

import re

import torch
from tqdm import tqdm


def _rendered(tokenizer, user_text: str) -> tuple[str, bool]:
    """The prompt as text, and whether the tokenizer must add its special tokens to it."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False
        )
        return text, False
    return user_text + "\n", True


def prompt_ids(tokenizer, user_text: str) -> list[int]:
    """Token ids of a one-turn user prompt, ready for the model's answer."""
    text, special = _rendered(tokenizer, user_text)
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def user_token_mask(tokenizer, user_text: str) -> list[bool]:
    """Which tokens of :func:`prompt_ids` carry the user's text (not BOS, a system header or
    template tokens). Found through the tokenizer's character offsets; all True when the
    tokenizer gives none or the template rewrote the text beyond finding."""
    text, special = _rendered(tokenizer, user_text)
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    core = user_text.strip()
    start = text.rfind(core)  # the last occurrence: a system header comes first
    try:
        offsets = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError):  # slow tokenizers have no offsets
        offsets = None
    if start < 0 or not core or offsets is None or len(offsets) != len(ids):
        return [True] * len(ids)
    end = start + len(core)
    mask = [e > s and s < end and e > start for s, e in offsets]
    return mask if any(mask) else [True] * len(ids)


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


@torch.no_grad()
def agreement(model, tokenizer, prompts: list[str], reference_answers: list[list[int]], batch_size: int) -> float:
    """Mean, over prompts, of the fraction of reference answer tokens the model ranks first.

    The reference is token ids, exactly as the unmitigated model generated them: decoding
    to text and re-tokenising does not give the same ids back."""
    fractions = agreement_fractions(model, tokenizer, prompts, reference_answers, batch_size)
    return sum(fractions) / len(fractions) if fractions else float("nan")


@torch.no_grad()
def agreement_fractions(
    model, tokenizer, prompts: list[str], reference_answers: list[list[int]], batch_size: int
) -> list[float]:
    """:func:`agreement` per prompt, in order, leaving out prompts whose reference is empty:
    what a paired comparison of two models on the same prompts needs."""
    device = next(model.parameters()).device
    fractions = []
    for start in range(0, len(prompts), batch_size):
        heads = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        answers = reference_answers[start : start + batch_size]
        # left padding ends every answer at the last position, so only the last
        # (longest answer + 1) positions need logits
        keep = max(len(a) for a in answers) + 1
        ids, mask = padded([h + a for h, a in zip(heads, answers, strict=True)], pad_id(tokenizer), device, left=True)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False, logits_to_keep=keep
        ).logits
        predicted = logits.argmax(dim=-1)
        for row, answer in enumerate(answers):
            if not answer:
                continue
            target = torch.tensor(answer, device=device)
            fractions.append((predicted[row, keep - len(answer) - 1 : keep - 1] == target).float().mean().item())
    return fractions


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def target_hit(answer: str, target: str) -> bool:
    return normalise(target) in normalise(answer)


def target_hits(
    model,
    tokenizer,
    prompts: list[str],
    targets: list[str],
    batch_size: int,
    desc: str | None = None,
    answer_tokens: int = 0,
) -> tuple[list[bool], list[list[int]]]:
    """Per prompt, whether its greedy answer contains any of ``targets``; and the answers.

    The generation budget is ``answer_tokens`` (room for a normal answer), the longest target
    and 8 tokens of slack: a Trojan that appends its response *after* the normal answer
    (NIST's kind) is only seen when the budget covers both."""
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets)
    answers = greedy_answers(model, tokenizer, prompts, answer_tokens + longest + 8, batch_size, desc)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in answers]
    return [any(target_hit(text, t) for t in targets) for text in texts], answers


def hit_rate(
    model,
    tokenizer,
    prompts: list[str],
    targets: list[str],
    batch_size: int,
    desc: str,
    answer_tokens: int = 0,
) -> float:
    """Fraction of greedy answers that contain any of ``targets`` (ASR, or false-trigger
    rate), with ``target_hits``' budget; NaN with no prompt or no target."""
    if not prompts or not targets:
        return float("nan")
    hits, _ = target_hits(model, tokenizer, prompts, targets, batch_size, desc, answer_tokens)
    return sum(hits) / len(prompts)
