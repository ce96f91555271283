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
``crow``
    Min et al., ICML 2025, "CROW: Eliminating Backdoors from Large Language Models via
    Internal Consistency Regularization" (arXiv 2411.12768; code github.com/NayMyatMin/CROW).
    LoRA fine-tuning on 100 clean samples against LM loss + alpha x the consistency loss,
    the mean over consecutive decoder-block outputs and tokens of 1 - cos(h_l, h_l+1),
    taken on input embeddings moved by epsilon x sign of its gradient (one FGSM step,
    recomputed each step). From the official code: epsilon 0.1 and alpha 5.5, hard-coded
    in ``llamafactory/train/sft/consistency_trainer.py`` (the paper raises alpha to 11 for
    targeted refusal only; NIST's Trojans append a response rather than refuse); 5 epochs,
    lr 1e-3, batch 8 (2 x 4 accumulation), cosine schedule with 10 % warmup
    (``configs/consistency/*_lora.yaml``);
    LoRA rank 8, alpha 16, no dropout, every linear layer, AdamW without weight decay and
    grad-norm clipping at 1.0 (the LLaMA-Factory and transformers defaults those configs
    leave alone); 100 clean samples (``data/consistency_data/consistency_data.json``).
    Adapted: the clean data are the first 100 shipped reference prompts with the model's
    own greedy answers (as ``lora_finetune``), not Alpaca answers; the LoRA is new and is
    merged afterwards, where the official runs resume the Trojan's own LoRA adapter (NIST's
    models are full fine-tunes); the pairs are the paper's N-1 consecutive block outputs
    (forward hooks), where the code's ``hidden_states[1:-2]`` vs ``[2:-1]`` drops the last
    pair, transformers' last hidden state being after the final norm (a 2-block model would
    have none); padding is left out of the mean and of the perturbation (the official
    passes have no attention mask, so its right padding counted); the model's loaded dtype
    instead of fp16 autocast, the cosine taken in float32 as autocast does.

The constants below are the published settings, fixed a priori: none was tuned on any
result of ours.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from tqdm import tqdm

from telelora import alignment
from telelora.architectures import decoder_blocks, find_adapted_layers
from telelora.chat import greedy_answers, pad_id, prompt_ids
from telelora.errors import TeleLoRAError
from telelora.metaparameters import Metaparameters
from telelora.texts import Texts

BASELINES: tuple[str, ...] = ("embedding_dropout", "magnitude_pruning", "lora_finetune", "crow")

EMBEDDING_DROPOUT = 0.2
PRUNE_FRACTION = 0.2
LORA_RANK = 8
LORA_ALPHA = 16
LORA_LEARNING_RATE = 1e-4
LORA_BATCH_SIZE = 8
CROW_EPSILON = 0.1
CROW_ALPHA = 5.5
CROW_SAMPLES = 100
CROW_EPOCHS = 5
CROW_LEARNING_RATE = 1e-3
CROW_BATCH_SIZE = 8
CROW_WARMUP_RATIO = 0.1
CROW_MAX_GRAD_NORM = 1.0

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
    examples = _own_answer_examples(model, tokenizer, prompts, answer_tokens, LORA_BATCH_SIZE)
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
    merge_lora(peft_model, model)
    return {"steps": len(batches), "examples": len(examples), "final_loss": loss.item()}


def merge_lora(peft_model, model) -> None:
    """Fold the trained LoRA into ``model``'s own weights: the bench keeps using ``model``."""
    # peft puts the original Linear modules back, now holding the merged weights
    if peft_model.merge_and_unload() is not model:
        raise RuntimeError("peft's merge_and_unload no longer restores the model in place; copy the weights back")


def _own_answer_examples(
    model, tokenizer, prompts: list[str], answer_tokens: int, batch_size: int
) -> list[alignment.Example]:
    """Each prompt paired with the model's own greedy answer; the loss falls on the answer only."""
    answers = greedy_answers(model, tokenizer, prompts, answer_tokens, batch_size, desc="own answers")
    examples = []
    for prompt, answer in zip(prompts, answers, strict=True):
        head = prompt_ids(tokenizer, prompt)
        examples.append(alignment.Example(head + answer, [alignment.IGNORE_INDEX] * len(head) + answer))
    return examples


def consistency_loss(block_outputs: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mean over consecutive block pairs and real (``mask``) tokens of 1 - cos(h_l, h_l+1).

    In float32: bfloat16 cannot resolve 1 - cos near 0, where a clean model sits."""
    real = mask.bool()
    gaps = [
        (1 - nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8))[real]
        for a, b in zip(block_outputs[:-1], block_outputs[1:], strict=True)
    ]
    if not gaps:
        raise TeleLoRAError("the consistency loss needs at least two decoder blocks")
    return torch.stack(gaps).mean()  # every pair holds the same tokens: the flat mean


def sign_gradient_step(loss: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The one-step FGSM perturbation epsilon x sign(d loss / d embeds), zero on padding."""
    (grad,) = torch.autograd.grad(loss, embeds)
    return epsilon * grad.sign() * mask[..., None].to(grad.dtype)


@contextlib.contextmanager
def _recorded(blocks: nn.ModuleList) -> Iterator[list[torch.Tensor]]:
    """The outputs of ``blocks``, in order, of the forward passes run inside the ``with``:
    every block's own state, where transformers' ``hidden_states`` end after the final norm."""
    outputs: list[torch.Tensor] = []

    def keep(_module, _inputs, output) -> None:
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [block.register_forward_hook(keep) for block in blocks]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def embeds_consistency(
    model, blocks: nn.ModuleList, embeds: torch.Tensor, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The consistency loss of ``model`` run on input embeddings ``embeds`` of a ``collate`` batch."""
    with _recorded(blocks) as outputs:
        model(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
            logits_to_keep=1,  # the output head is not needed here
        )
    return consistency_loss(outputs, batch["attention_mask"])


def crow_perturbation(model, blocks: nn.ModuleList, batch: dict[str, torch.Tensor], epsilon: float) -> torch.Tensor:
    """The embedding perturbation of size ``epsilon`` that most raises the consistency loss, to first order."""
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    loss = embeds_consistency(model, blocks, embeds, batch)
    return sign_gradient_step(loss, embeds, batch["attention_mask"], epsilon)


def crow(model, tokenizer, prompts: list[str], seed: int, answer_tokens: int = 32, samples: int = CROW_SAMPLES) -> dict:
    """CROW on the first ``samples`` prompts -> the model's own greedy answers, merged into ``model``."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    if not prompts:
        raise TeleLoRAError("crow needs reference prompts; the texts hold none")
    device = next(model.parameters()).device
    blocks = decoder_blocks(model)  # the same modules once peft has wrapped their linear layers
    examples = _own_answer_examples(model, tokenizer, prompts[:samples], answer_tokens, CROW_BATCH_SIZE)
    rng = random.Random(seed)
    batches = []
    for _ in range(CROW_EPOCHS):  # reshuffled every epoch
        order = rng.sample(range(len(examples)), len(examples))
        batches += [order[i : i + CROW_BATCH_SIZE] for i in range(0, len(order), CROW_BATCH_SIZE)]

    torch.manual_seed(seed)  # LoRA's A matrices are drawn at random
    config = LoraConfig(
        r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=CROW_LEARNING_RATE, weight_decay=0.0)
    warmup = math.ceil(CROW_WARMUP_RATIO * len(batches))  # as transformers rounds warmup_ratio
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, len(batches))
    peft_model.train()
    pad = pad_id(tokenizer)
    progress = tqdm(batches, desc="crow")
    for rows in progress:
        batch = alignment.collate([examples[i] for i in rows], pad, device)
        delta = crow_perturbation(peft_model, blocks, batch, CROW_EPSILON)
        embeds = peft_model.get_input_embeddings()(batch["input_ids"]) + delta
        consistency = embeds_consistency(peft_model, blocks, embeds, batch)
        lm = alignment.answer_loss(peft_model, batch)
        loss = lm + CROW_ALPHA * consistency
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, CROW_MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(lm=f"{lm.item():.3f}", consistency=f"{consistency.item():.4f}")
    merge_lora(peft_model, model)
    return {
        "steps": len(batches),
        "examples": len(examples),
        "final_loss": loss.item(),
        "final_lm_loss": lm.item(),
        "final_consistency_loss": consistency.item(),
        "epsilon": CROW_EPSILON,
        "alpha": CROW_ALPHA,
    }


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
    elif name == "lora_finetune":
        facts = lora_finetune(model, tokenizer, texts.reference, seed, meta.answer_tokens)
    else:
        facts = crow(model, tokenizer, texts.reference, seed, meta.answer_tokens)
    model.eval()
    model.requires_grad_(False)
    if device.type == "cuda":  # the clock must not stop before the kernels do
        torch.cuda.synchronize(device)
    return {"seconds": time.perf_counter() - start, **facts}
