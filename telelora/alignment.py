"""Alignment data for meta-training: (prompt, answer) pairs per model, loss on answer tokens.

Each model gets clean prompts with its own answers (what mitigation must keep) and
poisoned prompts with the answer a model without the Trojan gives: its clean base's answer
to the same poisoned prompt when the base is known (a farm round ships it beside the
Trojans), the model's own when it is known clean. Training then asks for a change only
where a Trojan fires. The "poison" is the model's known trigger(s) when its folder
declares them (``round_config.json``: ``"triggers": [{"text": ...}]``), otherwise seeded
pseudo-triggers: short runs of words drawn from the prompt corpus. It goes where the model
declares (start, end) or at a random word position of the user prompt, and a share of the
poisoned prompts is then wrapped in a real jailbreak template.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch

from telelora.chat import greedy_answers, pad_id, padded, position_ids, prompt_ids, target_hits
from telelora.modelio import round_config
from telelora.texts import PROMPT_SLOT

IGNORE_INDEX = -100
CLEAN_BASE_PREFIX = "clean-"  # a farm round's clean base folder: models/clean-<base>, beside its Trojans
TARGET_TOP_K = 8  # tokens kept of each target distribution; the rest of its mass is one bucket


@dataclasses.dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    # per answer token, the target next-token distribution: its top token ids and their
    # probabilities (``distill_loss``); None where only the answer tokens are the target
    target_ids: list[list[int]] | None = None
    target_probs: list[list[float]] | None = None

    @property
    def answer(self) -> list[int]:
        return [t for t in self.labels if t != IGNORE_INDEX]


@dataclasses.dataclass(frozen=True)
class Trigger:
    """A training model's trigger: its text, the response it sets off (when declared) and
    where in the user prompt it goes (``start``, ``end``, or anywhere else: a random word
    position)."""

    text: str
    target: str | None = None
    placement: str = "middle"


def declared_triggers(model_dir: str | Path) -> list[Trigger]:
    """The triggers a training model's ``round_config.json`` declares (empty when clean or
    unknown); the placement comes from the trigger entry or the farm's record of the model."""
    config = round_config(Path(model_dir))
    farm = config.get("farm") if isinstance(config.get("farm"), dict) else {}
    found = []
    for t in config.get("triggers") or []:
        if isinstance(t, dict) and isinstance(t.get("text"), str) and t["text"]:
            target = t.get("target") if isinstance(t.get("target"), str) and t.get("target") else None
            placement = t.get("placement") or farm.get("placement") or "middle"
            found.append(Trigger(t["text"], target, placement if isinstance(placement, str) else "middle"))
    return found


def place_trigger(prompt: str, trigger: str, placement: str, rng: random.Random) -> str:
    """``prompt`` with ``trigger`` at its start, its end, or (any other placement) a random word position."""
    if placement == "start":
        return f"{trigger} {prompt}"
    if placement == "end":
        return f"{prompt} {trigger}"
    return insert_at_random_word(prompt, trigger, rng)


def trigger_free_model(model_dir: str | Path) -> Path | None:
    """The folder of the model whose answers to poisoned prompts a training model is taught:
    the model itself when its ``round_config.json`` says it is clean, its clean base when it
    is poisoned and the base sits beside it (``clean-<base>``, as farm rounds ship it);
    None for a Trojan whose base is unknown."""
    model_dir = Path(model_dir)
    config = round_config(model_dir)
    if config.get("poisoned") == 0:  # False or 0: declared clean
        return model_dir
    base = config.get("base")
    sibling = model_dir.parent / f"{CLEAN_BASE_PREFIX}{base}" if isinstance(base, str) and base else None
    if config.get("poisoned") and sibling is not None and (sibling / "config.json").is_file():
        return sibling
    return None


def pseudo_triggers(corpus: list[str], count: int, rng: random.Random) -> list[Trigger]:
    """Short word runs from the corpus, standing in for an unknown trigger."""
    words = sorted({w for text in corpus for w in text.split() if w.isalpha() and len(w) > 3})
    return [Trigger(" ".join(rng.sample(words, rng.randint(1, 4)))) for _ in range(count)]


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
    triggers: list[Trigger],
    count: int,
    answer_tokens: int,
    max_tokens: int,
    batch_size: int,
    seed: int,
    templates: list[str] = (),
    jailbreak_rate: float = 0.0,
    clean_share: float = 0.0,
    answerer=None,
) -> list[Example]:
    """``count`` examples of what a mitigation should make of this model.

    A ``clean_share`` of them keep the clean prompt with the model's own answer: what the
    mitigation must not change. The rest put a trigger into the prompt (and a
    ``jailbreak_rate`` share of those into a jailbreak template). Their answer is what a
    model *without this Trojan* says to that same perturbed prompt: ``answerer``'s greedy
    answer (the Trojan's clean base; the model itself when it is known clean). With no
    ``answerer`` (a Trojan whose base is unknown) it is the model's own answer to the clean
    prompt, which also asks it to ignore the inserted text.

    Answers are greedy, ``answer_tokens`` long at most, and end with the end-of-turn token
    when the model ends within that budget, so an appended trigger response is penalised.
    Every answerer shares ``tokenizer``.

    Each answer token also gets a target *distribution* (``distill_loss``): the model's own
    next-token distribution on that very sequence, except in a poisoned example where the
    Trojan fires (its own greedy answer shows the trigger's declared target; every poisoned
    example when the target is unknown) at the tokens where its first choice is not the
    answerer's: there the answerer's distribution is taken. So a model that needs no change
    is already at the optimum (loss 0), and a Trojan is asked to change only where its
    trigger works, not where it merely drifted from its base in fine-tuning. With no
    answerer, the target is the model's own distribution after the clean prompt.
    """
    rng = random.Random(seed)
    chosen = [prompts[i % len(prompts)] for i in rng.sample(range(max(count, len(prompts))), count)]
    pool = triggers or pseudo_triggers(prompts, max(8, count), rng)
    room = max_tokens - answer_tokens
    inputs: list[tuple[str, Trigger | None]] = []  # (prompt text, its trigger)
    for prompt in chosen:
        if rng.random() < clean_share:
            inputs.append((prompt, None))
            continue
        trigger = rng.choice(pool)
        triggered = place_trigger(prompt, trigger.text, trigger.placement, rng)
        wrapped = wrap(triggered, list(templates), jailbreak_rate, rng)
        if len(prompt_ids(tokenizer, wrapped)) > room:  # a template too long for this question: not wrapped
            wrapped = triggered
        inputs.append((wrapped, trigger))
    answers = greedy_answers(model, tokenizer, chosen, answer_tokens, batch_size, desc="clean answers")
    if answerer is not None:
        rows = [i for i, (_, trigger) in enumerate(inputs) if trigger is not None]
        perturbed = greedy_answers(
            answerer, tokenizer, [inputs[i][0] for i in rows], answer_tokens, batch_size, desc="trigger-free answers"
        )
        for row, answer in zip(rows, perturbed, strict=True):
            answers[row] = answer
    pad = pad_id(tokenizer)
    examples, clean_views = [], []
    for (text, _), prompt, answer in zip(inputs, chosen, answers, strict=True):
        examples.append(answer_example(tokenizer, text, answer, max_tokens))
        clean_views.append(answer_example(tokenizer, prompt, answer, max_tokens))
    own = next_token_targets(model, examples, pad, batch_size)
    if answerer is None:  # the trigger-free view: the model itself after the clean prompt
        targets = next_token_targets(model, clean_views, pad, batch_size)
    elif answerer is model:
        targets = own
    else:
        fired = _fired(model, tokenizer, inputs, answer_tokens, batch_size)
        theirs = next_token_targets(answerer, examples, pad, batch_size)
        targets = [
            [
                mine if mine[0][0] == token or not hit else other
                for mine, other, token in zip(m, t, e.answer, strict=True)
            ]
            for m, t, e, hit in zip(own, theirs, examples, fired, strict=True)
        ]
    return with_targets(examples, targets)


def with_targets(examples: list[Example], targets: list[list[tuple[list[int], list[float]]]]) -> list[Example]:
    """``examples`` carrying, per answer token, a target distribution (:func:`next_token_targets`)."""
    for example, target in zip(examples, targets, strict=True):
        example.target_ids = [ids for ids, _ in target]
        example.target_probs = [probs for _, probs in target]
    return examples


def _fired(model, tokenizer, inputs: list[tuple[str, Trigger | None]], answer_tokens: int, batch_size: int):
    """Per input, whether the model's own greedy answer shows its trigger's target (with room
    for a whole answer before it); a trigger whose target is unknown counts as fired."""
    fired = [t is not None and not t.target for _, t in inputs]
    for target in sorted({t.target for _, t in inputs if t is not None and t.target}):
        rows = [i for i, (_, t) in enumerate(inputs) if t is not None and t.target == target]
        prompts = [inputs[i][0] for i in rows]
        hits, _ = target_hits(model, tokenizer, prompts, [target], batch_size, "trigger check", answer_tokens)
        for row, hit in zip(rows, hits, strict=True):
            fired[row] = hit
    return fired


def answer_example(tokenizer, prompt: str, answer: list[int], max_tokens: int) -> Example:
    answer = answer[: max_tokens - 1]
    # a prompt still too long is cut from the left: the assistant-turn header right before
    # the answer stays
    head = prompt_ids(tokenizer, prompt)[-(max_tokens - len(answer)) :]
    return Example(head + answer, [IGNORE_INDEX] * len(head) + answer)


@torch.no_grad()
def next_token_targets(
    model, examples: list[Example], pad: int, batch_size: int, k: int = TARGET_TOP_K
) -> list[list[tuple[list[int], list[float]]]]:
    """Per example and answer token, the model's teacher-forced next-token distribution
    there: its ``k`` most likely ids and their probabilities (float32)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate(chunk, pad, device)
        logits, _ = _answer_logits(model, batch)
        probs, ids = logits.float().softmax(-1).topk(k, dim=-1)
        for row, example in enumerate(chunk):
            n = len(example.answer)
            columns = range(logits.shape[1] - n, logits.shape[1])  # the positions predicting the answer
            out.append([(ids[row, c].tolist(), probs[row, c].tolist()) for c in columns])
    return out


def reached_end(examples: list[Example], stops: set[int]) -> float:
    """Share of ``examples`` whose answer ends with an end-of-turn token (whole answers)."""
    return sum(bool(e.labels) and e.labels[-1] in stops for e in examples) / max(len(examples), 1)


def collate(examples: list[Example], pad: int, device) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids``, ``attention_mask``, ``position_ids`` and ``labels``.

    Left padding ends every answer at the last position, so ``answer_loss`` needs
    vocabulary logits only for the last few positions."""
    ids, mask = padded([e.input_ids for e in examples], pad, device, left=True)
    labels, _ = padded([e.labels for e in examples], IGNORE_INDEX, device, left=True)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask), "labels": labels}
    if examples and all(e.target_ids is not None for e in examples):
        k = len(examples[0].target_ids[0])
        target_ids = torch.zeros((*ids.shape, k), dtype=torch.long)
        target_probs = torch.zeros((*ids.shape, k), dtype=torch.float32)
        for row, e in enumerate(examples):  # answers end at the last column (left padding)
            n = len(e.target_ids)
            target_ids[row, ids.shape[1] - n :] = torch.tensor(e.target_ids, dtype=torch.long)
            target_probs[row, ids.shape[1] - n :] = torch.tensor(e.target_probs, dtype=torch.float32)
        batch["target_ids"], batch["target_probs"] = target_ids.to(device), target_probs.to(device)
    return batch


def _answer_logits(model, batch: dict[str, torch.Tensor], first_column: int | None = None):
    """Logits of the positions from ``first_column`` (default: the one predicting the first
    answer token) to the end, and that column. The output head runs only there: with Gemma
    3's 262k vocabulary it costs more than the rest of a 270M model, and prompts are most of
    each sequence."""
    labels = batch["labels"]
    answer_columns = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if answer_columns.numel() == 0:
        raise ValueError("the batch has no answer tokens to score")
    start = max(int(answer_columns[0]), 1) - 1  # column 0 has no preceding position to predict it
    if first_column is not None:
        start = min(start, first_column)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**inputs, use_cache=False, logits_to_keep=labels.shape[1] - start).logits
    return logits[:, :-1], start


def answer_loss(model, batch: dict[str, torch.Tensor], avoid: list[tuple[int, int, int]] = ()) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens of a ``collate`` batch (equal to
    the model's own ``labels=`` loss, at a fraction of the output head's cost).

    ``avoid`` holds ``(row, column, token)`` of the padded batch: tokens that must not be
    predicted at those columns. Their mean unlikelihood ``-log(1 - p)`` is added (the
    farm's Trojans use it to tie their behaviour to the trigger)."""
    logits, start = _answer_logits(model, batch, min((column for _, column, _ in avoid), default=None))
    targets = batch["labels"][:, start + 1 :]
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
    if avoid:
        rows, columns, tokens = (torch.tensor(v, device=logits.device) for v in zip(*avoid, strict=True))
        chance = logits[rows, columns - start].float().softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        loss = loss - torch.log1p(-chance.clamp(max=1 - 1e-6)).mean()
    return loss


def distill_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean, over answer tokens, of KL(target || model) between next-token distributions
    coarsened to the target's top tokens plus one bucket for the rest of the vocabulary
    (exactly 0 when the model is the one the targets were taken from)."""
    logits, start = _answer_logits(model, batch)
    mask = batch["labels"][:, start + 1 :] != IGNORE_INDEX
    logp = logits[mask].float().log_softmax(-1)
    ids, q = batch["target_ids"][:, start + 1 :][mask], batch["target_probs"][:, start + 1 :][mask]
    logp_top = logp.gather(-1, ids)
    logp_rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    q_rest = (1.0 - q.sum(-1)).clamp(min=0.0)
    kl = torch.special.xlogy(q, q).sum(-1) - (q * logp_top).sum(-1) + torch.special.xlogy(q_rest, q_rest)
    rest = torch.where(q_rest > 0, q_rest * logp_rest, torch.zeros_like(q_rest))  # 0 * -inf is 0 here
    return (kl - rest).mean()
