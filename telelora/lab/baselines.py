"""Published data-free or cheap Trojan mitigations, to put beside TeleLoRA on the quality bench.

Each baseline changes an already-loaded Hugging Face causal LM in place (the bench loads
a fresh copy per method) and returns facts to report:

``embedding_dropout``
    SRI's data-free TrojAI entry: dropout with p = 0.2, applied once and for good, to the
    input embedding matrix; survivors are scaled by 1/(1-p) as inverted dropout does. With
    tied embeddings (SmolLM2, Gemma) the output head is the same tensor and is hit as
    well: that is what the entry does.
``magnitude_pruning``
    Peraton-style: in every adapted linear layer (fused ones such as Phi-3's ``qkv_proj``
    as one whole matrix), the 20 % of weights smallest in magnitude are set to zero, per
    matrix. Biases, norms and embeddings are left alone.
``lora_finetune``
    NIST's own baseline: one epoch of LoRA (rank 8, alpha 16, no dropout, every linear
    layer) with AdamW at lr 1e-4 and batch 8 on the shipped reference prompts paired
    with the model's own greedy answers, merged into plain weights afterwards.

The constants below are the published settings, fixed a priori: none was tuned on any
result of ours.
"""

from __future__ import annotations

import random
import time

import torch
from tqdm import tqdm

from telelora import alignment
from telelora.architectures import find_adapted_layers
from telelora.chat import greedy_answers, pad_id, prompt_ids
from telelora.errors import TeleLoRAError
from telelora.metaparameters import Metaparameters
from telelora.texts import Texts

BASELINES: tuple[str, ...] = ("embedding_dropout", "magnitude_pruning", "lora_finetune")

EMBEDDING_DROPOUT = 0.2
PRUNE_FRACTION = 0.2
LORA_RANK = 8
LORA_ALPHA = 16
LORA_LEARNING_RATE = 1e-4
LORA_BATCH_SIZE = 8

# embedding rows drawn per random mask: bounds the mask's memory for 128k-262k vocabularies
_DROPOUT_CHUNK_ROWS = 8192


@torch.no_grad()
def embedding_dropout(model, seed: int, p: float = EMBEDDING_DROPOUT) -> dict:
    """Zero each input-embedding entry with probability ``p`` and scale the rest by 1/(1-p)."""
    weight = model.get_input_embeddings().weight
    generator = torch.Generator(device=weight.device).manual_seed(seed)
    scale = 1.0 / (1.0 - p)
    zeroed = 0
    for rows in weight.split(_DROPOUT_CHUNK_ROWS):  # views: the writes land in ``weight``
        drop = torch.rand(rows.shape, generator=generator, device=rows.device) < p
        rows.masked_fill_(drop, 0.0).mul_(scale)
        zeroed += int(drop.sum())
    return {"zeroed_fraction": zeroed / weight.numel()}


@torch.no_grad()
def magnitude_pruning(model, projection_types: tuple[str, ...], fraction: float = PRUNE_FRACTION) -> dict:
    """Zero the ``fraction`` of weights smallest in magnitude in each adapted linear layer.

    Exactly that many per matrix (``topk`` indices, not a threshold): bfloat16 weights tie
    often enough that a threshold would prune noticeably more."""
    layers = find_adapted_layers(model, projection_types)
    zeroed = total = 0
    for layer in layers:
        flat = layer.module.weight.view(-1)
        count = round(fraction * flat.numel())
        smallest = flat.abs().topk(count, largest=False, sorted=False).indices
        flat.index_fill_(0, smallest, 0.0)
        zeroed, total = zeroed + count, total + flat.numel()
    return {"layers": len(layers), "zeroed_fraction": zeroed / total}


def lora_finetune(model, tokenizer, prompts: list[str], seed: int, answer_tokens: int = 32) -> dict:
    """One epoch of LoRA on ``prompts`` -> the model's own greedy answers, merged into ``model``."""
    from peft import LoraConfig, get_peft_model

    if not prompts:
        raise TeleLoRAError("lora_finetune needs reference prompts; the texts hold none")
    device = next(model.parameters()).device
    answers = greedy_answers(model, tokenizer, prompts, answer_tokens, LORA_BATCH_SIZE, desc="own answers")
    examples = []
    for prompt, answer in zip(prompts, answers, strict=True):
        head = prompt_ids(tokenizer, prompt)
        examples.append(alignment.Example(head + answer, [alignment.IGNORE_INDEX] * len(head) + answer))
    order = list(range(len(examples)))  # one epoch
    random.Random(seed).shuffle(order)
    batches = [order[i : i + LORA_BATCH_SIZE] for i in range(0, len(order), LORA_BATCH_SIZE)]

    torch.manual_seed(seed)  # LoRA's A matrices are drawn at random
    config = LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LORA_LEARNING_RATE)
    peft_model.train()
    pad = pad_id(tokenizer)
    progress = tqdm(batches, desc="lora fine-tune")
    for batch in progress:
        loss = alignment.answer_loss(peft_model, alignment.collate([examples[i] for i in batch], pad, device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    # peft puts the original Linear modules back, now holding the merged weights
    if peft_model.merge_and_unload() is not model:
        raise RuntimeError("peft's merge_and_unload no longer restores the model in place; copy the weights back")
    return {"steps": len(batches), "examples": len(examples), "final_loss": loss.item()}


def apply_baseline(name: str, model, tokenizer, texts: Texts, meta: Metaparameters, seed: int) -> dict:
    """Transform ``model`` in place as baseline ``name``; return facts to report, at least {"seconds": float}."""
    if name not in BASELINES:
        raise TeleLoRAError(f"unknown baseline {name!r}; choose one of: {', '.join(BASELINES)}")
    device = next(model.parameters()).device
    start = time.perf_counter()
    if name == "embedding_dropout":
        facts = embedding_dropout(model, seed)
    elif name == "magnitude_pruning":
        facts = magnitude_pruning(model, meta.target_projections)
    else:
        facts = lora_finetune(model, tokenizer, texts.reference, seed, meta.answer_tokens)
    model.eval()
    model.requires_grad_(False)
    if device.type == "cuda":  # the clock must not stop before the kernels do
        torch.cuda.synchronize(device)
    return {"seconds": time.perf_counter() - start, **facts}
