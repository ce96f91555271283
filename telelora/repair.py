"""Repair after a merge: distil the input back into the merged model on shipped clean prompts.

A merge toward another fine-tune of the same base takes a Trojan out, and part of the input's
normal behaviour with it: on full fine-tunes the merged model keeps 0.72-0.85 of the input's
answer tokens. The input still gives its normal answers, and the shipped prompts carry no
trigger, so its next-token distributions along its own greedy answers to ``repair_prompts`` of
them are a teacher that asks for the normal behaviour back and for nothing of the Trojan
(Fine-mixing, Zhang et al. 2022, repairs a merge with labelled clean data; here the labels are
the input's own). One adapter per adapted projection, the generators' multiplicative form
``W (I + V^T U)`` at rank ``rank`` and starting at the identity, is trained on the merged model
with ``configure``'s distillation loss, one pass over the examples in batches of
``repair_batch_size``. The change is then written into the merged weights exactly
(:class:`telelora.adapters.LowRankDelta`).
"""

from __future__ import annotations

import logging
import math
import random

import torch
from tqdm import tqdm

from telelora import modelio
from telelora.adapters import Adapter, LowRankDelta, applied
from telelora.alignment import Example, answer_example, collate, distill_loss, next_token_targets
from telelora.architectures import AdaptedLayer
from telelora.chat import greedy_answers, pad_id
from telelora.metaparameters import Metaparameters

log = logging.getLogger(__name__)


def teacher_examples(model, tokenizer, prompts: list[str], meta: Metaparameters) -> list[Example]:
    """The model's greedy answers to ``prompts`` (``answer_tokens`` at most), each answer token
    carrying the model's own next-token distribution there: run on the *input*, before the merge."""
    answers = greedy_answers(
        model, tokenizer, prompts, meta.answer_tokens, meta.activation_batch_size, "repair teacher"
    )
    examples = [answer_example(tokenizer, p, a, meta.max_tokens) for p, a in zip(prompts, answers, strict=True)]
    examples = [e for e in examples if e.answer]
    targets = next_token_targets(model, examples, pad_id(tokenizer), meta.activation_batch_size)
    for example, target in zip(examples, targets, strict=True):
        example.target_ids = [ids for ids, _ in target]
        example.target_probs = [probs for _, probs in target]
    return examples


def distil(
    model, tokenizer, layers: list[AdaptedLayer], examples: list[Example], meta: Metaparameters
) -> tuple[LowRankDelta, list[float]]:
    """Adapters trained on ``model`` as it now computes (the merge) toward ``examples``' targets,
    returned as the change of the weights, and the loss of each step. A step whose loss is not
    finite is skipped; so is the whole change when no step ran."""
    if not examples:
        raise ValueError("no repair example has an answer to learn")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(meta.seed)
    adapters = {}
    for layer in layers:
        width = layer.module.in_features
        u = torch.randn(meta.rank, width, generator=generator) / math.sqrt(width)
        adapters[layer.name] = Adapter(
            u.to(device).requires_grad_(), torch.zeros_like(u, device=device).requires_grad_()
        )
    params = [t for a in adapters.values() for t in (a.u, a.v)]
    optimizer = torch.optim.AdamW(params, lr=meta.repair_learning_rate, weight_decay=0.0)
    order = list(range(len(examples)))
    random.Random(meta.seed).shuffle(order)
    pad, losses = pad_id(tokenizer), []
    modelio.enable_checkpointing(model)
    modelio.disable_dropout(model)  # train mode, which checkpointing needs, must not add noise
    model.train()
    try:
        with applied(layers, adapters):
            starts = range(0, len(order), meta.repair_batch_size)
            for start in tqdm(starts, desc="repair", leave=False):
                batch = collate([examples[i] for i in order[start : start + meta.repair_batch_size]], pad, device)
                loss = distill_loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                if not math.isfinite(float(loss.detach())):
                    log.warning("repair: a batch's loss is not finite; its step is skipped")
                    continue
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        model.eval()
        modelio.disable_checkpointing(model)
    delta = LowRankDelta()
    if losses:
        trained = {name: Adapter(a.u.detach(), a.v.detach()) for name, a in adapters.items()}
        delta.add_step(layers, trained, 1.0)
    return delta, losses
