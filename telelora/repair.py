"""Repair after a merge: distil the input back into the merged model on shipped clean prompts.

A merge toward another fine-tune of the same base takes a Trojan out, and part of the input's
normal behaviour with it: on full fine-tunes the merged model keeps 0.72-0.85 of the input's
answer tokens. The input still gives its normal answers, and the shipped prompts carry no
trigger, so its next-token distributions along its own greedy answers to ``repair_prompts`` of
them are a teacher that asks for the normal behaviour back and for nothing of the Trojan
(Fine-mixing, Zhang et al. 2022, repairs a merge with labelled clean data; here the labels are
the input's own). One LoRA ``W + B A`` per adapted projection, rank ``rank``, starting at the
merge, is trained on the merged model with ``configure``'s distillation loss, one pass over the
examples in batches of ``repair_batch_size``. The change is then written into the merged
weights exactly (:class:`telelora.adapters.LowRankDelta`).
"""

from __future__ import annotations

import logging
import math
import random

import torch
from tqdm import tqdm

from telelora import modelio
from telelora.adapters import LowRankDelta
from telelora.alignment import Example, answer_example, collate, distill_loss, next_token_targets, with_targets
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
    return with_targets(examples, next_token_targets(model, examples, pad_id(tokenizer), meta.activation_batch_size))


def distil(
    model, tokenizer, layers: list[AdaptedLayer], examples: list[Example], meta: Metaparameters, epochs: int = 1
) -> tuple[LowRankDelta, list[float]]:
    """A low-rank change ``W + B A`` per layer trained on ``model`` as it now computes (the
    merge) toward ``examples``' targets, and the loss of each step. ``A`` starts as PEFT's LoRA
    does (uniform within ``1/sqrt(in_features)``), ``B`` at zero, so training starts at the merge.
    Additive, not the generators' ``W (I + V^T U)``: there the change of a layer scales with
    its weight, and one learning rate that moved some layers too little diverged others
    (session 19). ``epochs`` passes, each in its own shuffled order. A step whose loss is not
    finite is skipped; no step run, no change."""
    if not examples:
        raise ValueError("no repair example has an answer to learn")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, not {epochs}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(meta.seed)
    delta = LowRankDelta()
    for layer in layers:
        module = layer.module
        bound = 1 / math.sqrt(module.in_features)
        a = (torch.rand(meta.rank, module.in_features, generator=generator) * 2 - 1) * bound
        b = torch.zeros(module.out_features, meta.rank)
        delta.factors[layer.name] = (a.to(device).requires_grad_(), b.to(device).requires_grad_())
    params = [t for factors in delta.factors.values() for t in factors]
    optimizer = torch.optim.AdamW(params, lr=meta.repair_learning_rate, weight_decay=0.0)
    rng, order = random.Random(meta.seed), []
    for _ in range(epochs):
        epoch = list(range(len(examples)))
        rng.shuffle(epoch)
        order += epoch
    pad, losses = pad_id(tokenizer), []
    modelio.enable_checkpointing(model)
    modelio.disable_dropout(model)  # train mode, which checkpointing needs, must not add noise
    model.train()
    try:
        with delta.applied(layers):
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
    delta.factors = {name: (a.detach(), b.detach()) for name, (a, b) in delta.factors.items()} if losses else {}
    return delta, losses
