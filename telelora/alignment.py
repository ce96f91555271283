"""Alignment data for meta-training: (poisoned prompt, clean answer) pairs per model.

The clean answer is the model's own greedy answer to the clean prompt, so a Trojaned
model is taught to answer as if the trigger were absent and a clean one to ignore
inserted junk. The "poison" is the model's known trigger(s) when its folder declares them
(``round_config.json``: ``"triggers": [{"text": ...}]``), otherwise seeded pseudo-triggers:
short runs of words drawn from the prompt corpus. Either way it goes in at a random word
position of the user prompt, and a share of the poisoned prompts is then wrapped in a real
jailbreak template (augmentation: the answer stays the clean one). Loss is on answer
tokens only.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch

from telelora.chat import greedy_answers, padded, position_ids, prompt_ids
from telelora.modelio import round_config
from telelora.texts import PROMPT_SLOT

IGNORE_INDEX = -100


@dataclasses.dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens


def declared_triggers(model_dir: str | Path) -> list[str]:
    """Trigger texts a training model's ``round_config.json`` declares (empty when clean/unknown)."""
    triggers = round_config(Path(model_dir)).get("triggers") or []
    return [t["text"] for t in triggers if isinstance(t, dict) and t.get("text")]


def pseudo_triggers(corpus: list[str], count: int, rng: random.Random) -> list[str]:
    """Short word runs from the corpus, standing in for an unknown trigger."""
    words = sorted({w for text in corpus for w in text.split() if w.isalpha() and len(w) > 3})
    return [" ".join(rng.sample(words, rng.randint(1, 4))) for _ in range(count)]


def insert_at_random_word(prompt: str, trigger: str, rng: random.Random) -> str:
    words = prompt.split(" ")
    position = rng.randint(0, len(words))
    return " ".join(words[:position] + [trigger] + words[position:])


def wrap(prompt: str, templates: list[str], jailbreak_rate: float, rng) -> str:
    """With probability ``jailbreak_rate``, ``prompt`` put into the ``{{ prompt }}`` slot of
    one of the jailbreak ``templates``; otherwise ``prompt`` itself."""
    if templates and rng.random() < jailbreak_rate:
        return rng.choice(templates).replace(PROMPT_SLOT, prompt)
    return prompt


def build_examples(
    model,
    tokenizer,
    prompts: list[str],
    triggers: list[str],
    count: int,
    answer_tokens: int,
    max_tokens: int,
    batch_size: int,
    seed: int,
    templates: list[str] = (),
    jailbreak_rate: float = 0.0,
) -> list[Example]:
    """``count`` examples: poisoned prompt -> the model's own answer to the clean prompt."""
    rng = random.Random(seed)
    chosen = [prompts[i % len(prompts)] for i in rng.sample(range(max(count, len(prompts))), count)]
    pool = triggers or pseudo_triggers(prompts, max(8, count), rng)
    answers = greedy_answers(model, tokenizer, chosen, answer_tokens, batch_size, desc="clean answers")
    examples = []
    for prompt, answer in zip(chosen, answers, strict=True):
        answer = answer[: max_tokens - 1]
        room = max_tokens - len(answer)
        triggered = insert_at_random_word(prompt, rng.choice(pool), rng)
        head = prompt_ids(tokenizer, wrap(triggered, list(templates), jailbreak_rate, rng))
        if len(head) > room:  # a template too long for this question: keep it unwrapped
            head = prompt_ids(tokenizer, triggered)
        # a prompt still too long is cut from the left: the assistant-turn header right
        # before the answer stays
        head = head[-room:]
        ids = head + answer
        labels = [IGNORE_INDEX] * len(head) + answer
        examples.append(Example(ids, labels))
    return examples


def collate(examples: list[Example], pad: int, device) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids``, ``attention_mask``, ``position_ids`` and ``labels``.

    Left padding ends every answer at the last position, so ``answer_loss`` needs
    vocabulary logits only for the last few positions."""
    ids, mask = padded([e.input_ids for e in examples], pad, device, left=True)
    labels, _ = padded([e.labels for e in examples], IGNORE_INDEX, device, left=True)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask), "labels": labels}


def answer_loss(model, batch: dict[str, torch.Tensor], avoid: list[tuple[int, int, int]] = ()) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens of a ``collate`` batch.

    Equal to the model's own ``labels=`` loss, but the output head runs only on the
    positions that predict an answer token: with Gemma 3's 262k vocabulary the head costs
    more than the rest of a 270M model, and prompts are most of each sequence.

    ``avoid`` holds ``(row, column, token)`` of the padded batch: tokens that must not be
    predicted at those columns. Their mean unlikelihood ``-log(1 - p)`` is added (the
    farm's Trojans use it to tie their behaviour to the trigger)."""
    labels = batch["labels"]
    answer_columns = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if answer_columns.numel() == 0:
        raise ValueError("the batch has no answer tokens to score")
    first = max(int(answer_columns[0]), 1)  # column 0 has no preceding position to predict it
    start = min([first - 1, *(column for _, column, _ in avoid)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=labels.shape[1] - start).logits
    targets = labels[:, start + 1 :]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
    if avoid:
        rows, columns, tokens = (torch.tensor(v, device=logits.device) for v in zip(*avoid, strict=True))
        chance = logits[rows, columns - start].float().softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        loss = loss - torch.log1p(-chance.clamp(max=1 - 1e-6)).mean()
    return loss
