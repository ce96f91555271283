"""Does the generator carry alignment from one LLM to another? The paper's jailbreak synergy (Table 1b).

The paper (section 4, "Jailbreak Mitigation") gives each of 8 LLMs 5 jailbreaks of its own and
measures the perplexity of unseen alignment examples over all 40 jailbreaks on those LLMs:
model-specific LoRA 11.31, model-agnostic LoRA 11.86, TeleLoRA 10.96 (lower is better). The
claim is synergy: a generator shared by every LLM passes what one learned to the others.

Here, with every LLM this machine provides (``--models``: the two real bases and clean farm
fine-tunes), each LLM is assigned ``--jailbreaks_per_llm`` of the shipped PyRIT templates
(``learned_parameters/texts.json``), disjoint between LLMs, and ``--never`` more are assigned
to none. An **alignment example** is a template wrapping a prompt, answered with the LLM's own
greedy answer to the *plain* prompt: the wrapper must change nothing. These models have no
safety training to restore, so this reads the paper's "alignment examples" as "answer as if
the jailbreak were not there". Rows, at one compute budget (``--steps`` batches of
``--batch_size`` per LLM) and one adapter (``W (I + V^T U)`` on the metaparameters'
projections, rank ``rank``):

* ``none``: no adapter;
* ``model_specific_lora``: per LLM, an adapter trained on its own examples (its jailbreaks);
* ``model_agnostic_lora``: per LLM, an adapter trained on every LLM's examples, each with the
  answer of the LLM it belongs to (re-tokenised);
* ``model_specific_telelora``: per LLM, generators meta-trained the same way on its own
  examples only (``--steps`` steps, the model-specific LoRA's budget): what the generator
  fits with nothing shared, so that ``telelora`` against it is what sharing adds;
* ``telelora``: generators meta-trained by ``configure``'s step on every LLM's own examples
  (``--steps`` x LLMs steps, one LLM's batch each), then applied to each LLM as ``mitigate``
  does (layer bound and drift guard included).

Per LLM: perplexity of held-out examples (test prompts never trained on) of its own jailbreaks,
of the other LLMs' jailbreaks, of the never-assigned ones, and of all assigned (the paper's
figure); agreement with its own greedy answers on plain test prompts (what the adapter costs).
Means over LLMs with bootstrap intervals. With the ``telelora`` row, the cosine between the
shared generators' gradients from batches of one LLM and of different LLMs, at the start and
the end of meta-training (``--gradient_batches``): whether the LLMs pull the generators alike.
The adapters' learning rate is chosen per LoRA row on validation prompts (``--lora_lrs``); test
prompts only report. Every adapter is trained in float32 on the CPU or the metaparameters' device.

    OMP_NUM_THREADS=1 python bench/jailbreak_synergy.py \\
        --models smollm2=~/.cache/telelora/models/smollm2-135m-instruct gemma3=~/.cache/telelora/models/gemma3-270m \\
        ff16=~/fft-id-00000016/models/id-00000016 ... --workdir ~/exp/synergy \\
        --out bench/results/jailbreak_synergy_cpu.json

Resumable: each LLM's answers are cached in ``--workdir``, meta-training checkpoints there, and
``--out`` is rewritten after every (row, LLM) measured; ``--resume`` keeps what matches. The work
splits over processes: ``--rows`` and ``--llms`` pick what one measures, and processes started
with ``--resume`` on one ``--out`` merge their results into it (under a lock) at every write.
Prints a table, writes JSON and a PNG beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import math
import random
import sys
import time
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.mitigation_quality import bootstrap_mean  # noqa: E402
from telelora import activations, checkpoint, configure, guard, metaparameters, modelio  # noqa: E402
from telelora.adapters import Adapter, applied  # noqa: E402
from telelora.alignment import Example, answer_example, answer_loss, collate  # noqa: E402
from telelora.chat import agreement, greedy_answers, pad_id, prompt_ids, stop_ids  # noqa: E402
from telelora.configure import LoadedModel, TrainingModel, load_llm  # noqa: E402
from telelora.distributed import World  # noqa: E402
from telelora.errors import TeleLoRAError  # noqa: E402
from telelora.generated import plan_mitigation  # noqa: E402
from telelora.generator import GeneratorBank  # noqa: E402
from telelora.io_utils import atomic_write_text  # noqa: E402
from telelora.lab.curves import save_figure  # noqa: E402
from telelora.metaparameters import REPO_ROOT, Metaparameters  # noqa: E402
from telelora.texts import PROMPT_SLOT, Texts  # noqa: E402
from telelora.texts import load as load_texts  # noqa: E402

ROWS = ("none", "model_specific_lora", "model_agnostic_lora", "model_specific_telelora", "telelora")
GROUPS = ("own", "other", "never", "assigned")  # assigned: own + other, the paper's "all 40 jailbreaks"
PAPER = {"model_specific_lora": 11.31, "model_agnostic_lora": 11.86, "telelora": 10.96}  # Table 1b, seen LLMs
MAX_PROMPT_CHARS = 240  # short questions: CPU-sized sequences


@dataclasses.dataclass
class LLM:
    label: str
    path: Path


@dataclasses.dataclass
class Plan:
    """The seeded assignment: which templates each LLM owns, which none does, which prompts train,
    choose the learning rate (validation) and report (test), and which train prompts each template wraps."""

    templates: list[str]
    assigned: dict[str, list[int]]  # LLM label -> template indices
    never: list[int]
    train_prompts: list[str]
    validation_prompts: list[str]
    test_prompts: list[str]
    draws: dict[int, list[int]]  # assigned template -> indices into train_prompts


def parse_models(specs: list[str]) -> list[LLM]:
    """``LABEL=PATH`` or ``PATH`` (label: the folder's name); labels must be distinct."""
    llms = []
    for spec in specs:
        label, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path = Path(path).expanduser()
        llms.append(LLM(label or path.name, path))
    labels = [m.label for m in llms]
    if len(set(labels)) != len(labels):
        raise TeleLoRAError(f"--models: labels must be distinct (got {labels}); name them LABEL=PATH")
    for llm in llms:
        modelio.check_model_dir(llm.path)
    return llms


def make_plan(llms: list[LLM], texts: Texts, tokenizers: dict, args, room: int) -> Plan:
    """Templates that fit every LLM's context with the longest prompt used, shuffled and dealt;
    prompts short, shuffled, split three ways."""
    rng = random.Random(args.seed)
    prompts = [p for p in texts.alignment if len(p) <= MAX_PROMPT_CHARS]
    rng.shuffle(prompts)
    sizes = (args.train_prompts, args.validation_prompts, args.test_prompts)
    if sum(sizes) > len(prompts):
        raise TeleLoRAError(f"{sum(sizes)} prompts asked for, {len(prompts)} short ones ship")
    train = prompts[: sizes[0]]
    validation = prompts[sizes[0] : sizes[0] + sizes[1]]
    test = prompts[sizes[0] + sizes[1] : sum(sizes)]
    longest = max(train + validation + test, key=len)
    fitting = [
        t
        for t in texts.jailbreak_templates
        if all(len(prompt_ids(tok, t.replace(PROMPT_SLOT, longest))) <= room for tok in tokenizers.values())
    ]
    needed = len(llms) * args.jailbreaks_per_llm + args.never
    if len(fitting) < needed:
        raise TeleLoRAError(f"{needed} jailbreak templates needed, {len(fitting)} fit {room} tokens")
    rng.shuffle(fitting)
    templates = fitting[:needed]
    per = args.jailbreaks_per_llm
    assigned = {m.label: list(range(i * per, (i + 1) * per)) for i, m in enumerate(llms)}
    never = list(range(len(llms) * per, needed))
    draws = {
        j: rng.sample(range(len(train)), args.examples_per_jailbreak) for owned in assigned.values() for j in owned
    }
    return Plan(templates, assigned, never, train, validation, test, draws)


def wrapped(template: str, prompt: str) -> str:
    return template.replace(PROMPT_SLOT, prompt)


# ---- each LLM's own answers (cached) -------------------------------------------------------


def answers_of(llm: LLM, plan: Plan, meta: Metaparameters, args, device) -> dict:
    """The LLM's greedy answers to every plain prompt of the plan, as token ids and text."""
    prompts = plan.train_prompts + plan.validation_prompts + plan.test_prompts
    key = hashlib.sha256(json.dumps([str(llm.path.resolve()), prompts, args.answer_tokens]).encode()).hexdigest()[:16]
    cache = Path(args.workdir) / "answers" / f"{llm.label}-{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    tokenizer = modelio.load_tokenizer(llm.path)
    model = modelio.load_model(llm.path, device, torch.float32)
    ids = greedy_answers(model, tokenizer, prompts, args.answer_tokens, meta.activation_batch_size, llm.label)
    stops = stop_ids(model, tokenizer)
    result = {
        "ids": ids,
        "text": [tokenizer.decode([t for t in a if t not in stops], skip_special_tokens=True) for a in ids],
        "ended": [bool(a) and a[-1] in stops for a in ids],
        "stop": next((a[-1] for a in ids if a and a[-1] in stops), min(stops) if stops else None),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps(result))
    return result


def example(tokenizer, prompt: str, answer: list[int], max_tokens: int) -> Example:
    """``alignment.answer_example`` with one-hot targets, so ``configure``'s distillation loss
    is this answer's cross-entropy, as for LoRA."""
    out = answer_example(tokenizer, prompt, answer, max_tokens)
    out.target_ids, out.target_probs = [[t] for t in out.answer], [[1.0]] * len(out.answer)
    return out


def retokenised(answers: dict, index: int, tokenizer, stop: int | None) -> list[int]:
    """Another LLM's answer in this LLM's tokens, ended with this LLM's stop token where it ended."""
    ids = tokenizer.encode(answers["text"][index], add_special_tokens=False)
    return ids + [stop] if answers["ended"][index] and stop is not None else ids


@dataclasses.dataclass
class Data:
    """One LLM's examples: training (own, agnostic), validation and test (by template)."""

    own: list[Example]
    agnostic: list[Example]
    validation: dict[str, list[Example]]  # group -> examples
    test: dict[str, list[Example]]
    plain_prompts: list[str]
    plain_answers: list[list[int]]


def build_data(llm: LLM, llms: list[LLM], plan: Plan, answers: dict[str, dict], tokenizer, max_tokens: int) -> Data:
    mine = answers[llm.label]
    n_train, n_val = len(plan.train_prompts), len(plan.validation_prompts)

    def owned_examples(owner: LLM) -> list[Example]:
        theirs = answers[owner.label]
        out = []
        for j in plan.assigned[owner.label]:
            for p in plan.draws[j]:
                answer = mine["ids"][p] if owner is llm else retokenised(theirs, p, tokenizer, mine["stop"])
                out.append(example(tokenizer, wrapped(plan.templates[j], plan.train_prompts[p]), answer, max_tokens))
        return out

    def held_out(prompts: list[str], offset: int) -> dict[str, list[Example]]:
        own = plan.assigned[llm.label]
        other = [j for m in llms if m is not llm for j in plan.assigned[m.label]]
        groups = {"own": own, "other": other, "never": plan.never}
        return {
            group: [
                example(tokenizer, wrapped(plan.templates[j], q), mine["ids"][offset + i], max_tokens)
                for j in indices
                for i, q in enumerate(prompts)
            ]
            for group, indices in groups.items()
        }

    return Data(
        own=owned_examples(llm),
        agnostic=[e for m in llms for e in owned_examples(m)],
        validation=held_out(plan.validation_prompts, n_train),
        test=held_out(plan.test_prompts, n_train + n_val),
        plain_prompts=plan.test_prompts,
        plain_answers=mine["ids"][n_train + n_val :],
    )


# ---- adapters -------------------------------------------------------------------------------


def train_lora(loaded, examples: list[Example], pad: int, args, lr: float, seed: int, device) -> dict[str, Adapter]:
    """``--steps`` AdamW steps of ``--batch_size`` examples on a fresh adapter per layer
    (``V = 0``: it starts as the identity, as the generators do)."""
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for layer in loaded.layers:
        width = layer.module.in_features
        u = torch.randn(args.rank, width, generator=generator) / math.sqrt(width)
        adapters[layer.name] = Adapter(
            u.to(device).requires_grad_(), torch.zeros_like(u, device=device).requires_grad_()
        )
    params = [t for a in adapters.values() for t in (a.u, a.v)]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    loaded.model.train()
    with applied(loaded.layers, adapters):
        for _ in tqdm(range(args.steps), desc=f"LoRA at lr {lr:g}", leave=False):
            batch = collate(rng.sample(examples, min(args.batch_size, len(examples))), pad, device)
            loss = answer_loss(loaded.model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    loaded.model.eval()
    return {name: Adapter(a.u.detach(), a.v.detach()) for name, a in adapters.items()}


@torch.no_grad()
def perplexity(model, examples: list[Example], pad: int, batch_size: int, device) -> float:
    """``exp`` of the mean next-token cross-entropy over every answer token of ``examples``."""
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        count = sum(len(e.answer) for e in chunk)
        total += float(answer_loss(model, collate(chunk, pad, device))) * count
        tokens += count
    return math.exp(total / tokens)


def measure(loaded, tokenizer, data: Data, adapters, delta, args, device) -> dict:
    """Test perplexities by group and plain-prompt agreement with ``adapters`` hooked in (or ``delta``)."""
    pad = pad_id(tokenizer)
    context = delta.applied(loaded.layers) if delta is not None else applied(loaded.layers, adapters or {})
    with context:
        figures = {f"ppl_{g}": perplexity(loaded.model, data.test[g], pad, args.eval_batch_size, device)
                   for g in ("own", "other", "never")}  # fmt: skip
        assigned = data.test["own"] + data.test["other"]
        figures["ppl_assigned"] = perplexity(loaded.model, assigned, pad, args.eval_batch_size, device)
        figures["agreement"] = agreement(
            loaded.model, tokenizer, data.plain_prompts, data.plain_answers, args.eval_batch_size
        )
    return figures


def validation_ppl(loaded, tokenizer, data: Data, adapters, args, device) -> float:
    """What the learning rate is chosen on: every assigned jailbreak around validation prompts."""
    with applied(loaded.layers, adapters):
        examples = data.validation["own"] + data.validation["other"]
        return perplexity(loaded.model, examples, pad_id(tokenizer), args.eval_batch_size, device)


# ---- TeleLoRA: configure's meta-training step on every LLM's own examples ---------------------


def training_item(
    llm: LLM, examples: list[Example], meta: Metaparameters, texts: Texts, device
) -> tuple[TrainingModel, LoadedModel]:
    """``llm`` loaded for meta-training, and what ``configure``'s step needs of it: its reference
    activations and ``examples``."""
    loaded = load_llm(llm.path, meta, device)
    tokenizer = modelio.load_tokenizer(llm.path)
    acts = activations.collect(
        loaded.model, tokenizer, loaded.layers, texts.reference[: meta.num_reference_texts],
        meta.activation_tokens, meta.activation_batch_size, meta.max_tokens, meta.seed,
    )  # fmt: skip
    layer_types = {layer.name: (layer.projection_type, layer.depth) for layer in loaded.layers}
    item = TrainingModel(llm.path, {k: v.cpu() for k, v in acts.items()}, examples, [], pad_id(tokenizer),
                         llm.label, layer_types)  # fmt: skip
    return item, loaded


def initial_bank(meta: Metaparameters, device) -> GeneratorBank:
    """The generators meta-training starts from (seeded)."""
    torch.manual_seed(meta.seed)
    return GeneratorBank.from_metaparameters(meta).to(device)


def meta_fingerprint(llms: list[LLM], meta: Metaparameters, args) -> dict:
    """What a meta-training checkpoint must match to be resumed (or read by another bench)."""
    return {
        "llms": [str(m.path.resolve()) for m in llms],
        "settings": _settings(args),
        "meta": metaparameters.meta_training_knobs(meta),
    }


def meta_train(llms, datas, meta: Metaparameters, args, device, path: Path) -> tuple[GeneratorBank, dict, list[dict]]:
    """Generators meta-trained on ``llms`` with ``configure.meta_step`` (``--steps`` per LLM, one
    LLM's batch per step, picked at random as ``configure`` does), checkpointed at ``path``;
    their layer ranges for the guard."""
    pool = configure.ModelPool(meta, device, 64 * 2**30)
    texts = load_texts(args.learned_parameters)
    items = []
    for llm in tqdm(llms, desc="reference activations"):
        item, loaded = training_item(llm, datas[llm.label].own, meta, texts, device)
        items.append(item)
        pool.offer(llm.path, loaded)
    bank = initial_bank(meta, device)
    optimizer = torch.optim.AdamW(bank.parameters(), lr=meta.learning_rate)
    rng = random.Random(meta.seed)
    total = args.steps * len(llms)
    records: list[dict] = []
    fingerprint = meta_fingerprint(llms, meta, args)
    start = 0
    if path.is_file():
        state = checkpoint.load(path, fingerprint)
        bank.load_state_dict(state["bank"])
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(configure.as_random_state(state["rng"]))
        torch.set_rng_state(state["torch_rng"])
        start, records = state["step"], state["records"]
    tuned = dataclasses.replace(meta, train_batch_size=args.batch_size)
    for step in tqdm(range(start, total), desc="meta-training", initial=start, total=total):
        work = configure.pick_work(items, pool, rng, tuned)
        losses, loss, grad_norm = configure.meta_step(bank, optimizer, work, tuned, device, World())
        records.append({"step": step, "model": work[0][0].architecture, "loss": loss, "grad_norm": grad_norm})
        del work
        if (step + 1) % args.checkpoint_interval == 0 or step + 1 == total:
            state = {"fingerprint": fingerprint, "step": step + 1, "bank": bank.state_dict(),
                     "optimizer": optimizer.state_dict(), "rng": rng.getstate(), "torch_rng": torch.get_rng_state(),
                     "records": records}  # fmt: skip
            checkpoint.save(path, state)
    ranges = guard.layer_ranges(configure.adapter_norms(bank, items, meta, device))
    return bank, ranges, records


def gradient_agreement(llms: list[LLM], datas: dict, meta: Metaparameters, args, device, banks: dict) -> dict:
    """Do the LLMs pull the shared generators the same way? Per bank (``initial``: where
    meta-training starts; ``final``: where it ended), the generators' gradient from each of
    ``--gradient_batches`` seeded batches of each LLM's own examples (``configure``'s step, no
    update), and the cosine of every pair: two batches of one LLM (``within``), of two LLMs of
    one model type (``same_type``), of two types (``other_type``). Sharing can only help where
    the LLMs' gradients point alike, as two batches of one LLM's do."""
    texts = load_texts(args.learned_parameters)
    tuned = dataclasses.replace(meta, train_batch_size=args.batch_size)
    grads: dict[str, dict[tuple[str, int], torch.Tensor]] = {name: {} for name in banks}
    losses: dict[str, dict[str, list[float]]] = {name: {} for name in banks}
    types = {}
    for llm in tqdm(llms, desc="generator gradients"):
        item, loaded = training_item(llm, datas[llm.label].own, meta, texts, device)
        types[llm.label] = loaded.model.config.model_type
        rng = random.Random(args.seed + zlib.crc32(llm.label.encode()))
        size = min(args.batch_size, len(item.examples))
        batches = [rng.sample(item.examples, size) for _ in range(args.gradient_batches)]
        for name, bank in banks.items():
            for b, batch in enumerate(batches):
                bank.zero_grad(set_to_none=True)
                loss = configure.train_step(bank, item, loaded, batch, tuned, device)
                losses[name].setdefault(llm.label, []).append(loss)
                grads[name][llm.label, b] = torch.cat(
                    [(q.grad if q.grad is not None else torch.zeros_like(q)).flatten().cpu() for q in bank.parameters()]
                )
        del item, loaded
    out = {"types": types, "batches": args.gradient_batches, "banks": {}}
    for name, by_key in grads.items():
        keys = list(by_key)
        pairs = []
        for i, (a, batch_a) in enumerate(keys):
            for b, batch_b in keys[i + 1 :]:
                cosine = float(torch.nn.functional.cosine_similarity(by_key[a, batch_a], by_key[b, batch_b], dim=0))
                kind = "within" if a == b else "same_type" if types[a] == types[b] else "other_type"
                pairs.append({"a": a, "b": b, "kind": kind, "cosine": cosine})
        means = {
            kind: _mean_or_none([p["cosine"] for p in pairs if p["kind"] == kind])
            for kind in ("within", "same_type", "other_type")
        }
        out["banks"][name] = {"mean_cosine": means, "losses": losses[name], "pairs": pairs}
    return out


def _mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def final_bank(llms: list[LLM], meta: Metaparameters, args, device) -> GeneratorBank | None:
    """The shared generators as meta-training ended, or None while it has not."""
    path = args.workdir / "meta_training.pt"
    if not path.is_file():
        return None
    state = checkpoint.load(path, meta_fingerprint(llms, meta, args))
    if state["step"] < args.steps * len(llms):
        return None
    bank = GeneratorBank.from_metaparameters(meta).to(device)
    bank.load_state_dict(state["bank"])
    return bank


# ---- the run ----------------------------------------------------------------------------------


def _settings(args) -> dict:
    keys = ("models", "seed", "jailbreaks_per_llm", "never", "examples_per_jailbreak", "train_prompts",
            "validation_prompts", "test_prompts", "answer_tokens", "max_tokens", "steps", "batch_size",
            "rank", "lora_lrs")  # fmt: skip
    return {k: getattr(args, k) for k in keys}


def summarise(rows: list[dict]) -> list[dict]:
    """Per row: each figure's mean over LLMs with its bootstrap interval."""
    out = []
    for name in ROWS:
        mine = [r for r in rows if r["row"] == name]
        if mine:
            keys = [f"ppl_{g}" for g in GROUPS] + ["agreement"]
            out.append({"row": name, "llms": len(mine), **{k: bootstrap_mean([r[k] for r in mine]) for k in keys}})
    return out


def synergy(summary: list[dict], rows: list[dict]) -> dict:
    """TeleLoRA below both LoRA rows on the other LLMs' jailbreaks with intervals apart; beside
    it, TeleLoRA minus each other row, paired by LLM (mean and interval over the LLMs both have)."""
    by = {s["row"]: s for s in summary}
    ppl = {(r["row"], r["llm"]): r["ppl_other"] for r in rows}
    paired = {}
    for name in by:
        both = [llm for (row, llm) in ppl if row == name and ("telelora", llm) in ppl]
        if name != "telelora" and both:
            paired[name] = bootstrap_mean([ppl["telelora", llm] - ppl[name, llm] for llm in both])
    if not all(r in by for r in ("telelora", "model_specific_lora", "model_agnostic_lora")):
        return {"decided": False, "telelora_minus": paired}
    tele = by["telelora"]["ppl_other"]
    apart = {r: tele["high"] < by[r]["ppl_other"]["low"] for r in ("model_specific_lora", "model_agnostic_lora")}
    return {"decided": True, "apart_from": apart, "synergy": all(apart.values()), "telelora_minus": paired}


def format_table(summary: list[dict], markdown: bool) -> str:
    def cell(stat: dict) -> str:
        return f"{stat['mean']:.2f} [{stat['low']:.2f}, {stat['high']:.2f}]"

    header = ["row", "LLMs", "own", "other LLMs'", "never assigned", "all assigned", "paper (all 40)", "agreement"]
    body = [
        [
            s["row"],
            str(s["llms"]),
            *(cell(s[f"ppl_{g}"]) for g in GROUPS),
            f"{PAPER[s['row']]:.2f}" if s["row"] in PAPER else "-",
            cell(s["agreement"]),
        ]  # fmt: skip
        for s in summary
    ]
    if markdown:
        return "\n".join("| " + " | ".join(line) + " |" for line in [header, ["---"] * len(header), *body])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in [header, *body])


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot(summary: list[dict], rows: list[dict], records: list[dict], gradients: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right, third) = plt.subplots(1, 3, figsize=(18, 4.5))
    width = 0.8 / max(len(summary), 1)
    for i, s in enumerate(summary):
        means = [s[f"ppl_{g}"]["mean"] for g in GROUPS]
        errors = [[m - s[f"ppl_{g}"]["low"] for m, g in zip(means, GROUPS, strict=True)],
                  [s[f"ppl_{g}"]["high"] - m for m, g in zip(means, GROUPS, strict=True)]]  # fmt: skip
        left.bar([k + i * width for k in range(len(GROUPS))], means, width, yerr=errors, label=s["row"], capsize=3)
    left.set_xticks([k + width * (len(summary) - 1) / 2 for k in range(len(GROUPS))], GROUPS)
    left.set(ylabel="perplexity of held-out alignment examples (lower is better)", title="mean over LLMs, 95% interval")
    left.legend(fontsize="small")
    curves = {}  # LLM -> {row: its losses, in the order of its batches}
    for r in records:
        curves.setdefault(r["model"], {}).setdefault("telelora", []).append(r["loss"])
    for r in rows:
        if r["row"] == "model_specific_telelora":
            curves.setdefault(r["llm"], {})["model_specific_telelora"] = r["losses"]
    untouched = {r["llm"]: math.log(r["ppl_own"]) for r in rows if r["row"] == "none"}
    for i, (llm, by_row) in enumerate(sorted(curves.items())):
        for name, style in (("telelora", "-"), ("model_specific_telelora", "--")):
            if name in by_row:
                right.plot(running_mean(by_row[name], 8), style, color=f"C{i}", label=f"{llm}, {name}")
        if llm in untouched:
            right.axhline(untouched[llm], color=f"C{i}", linestyle=":", linewidth=0.8)
    if curves:
        right.set(xlabel="batches of that LLM", ylabel="loss (answer cross-entropy), running mean of 8",
                  title="meta-training per LLM (dotted: no adapter, own jailbreaks' test examples)")  # fmt: skip
        right.legend(fontsize="x-small", ncol=2)
    kinds = ("within", "same_type", "other_type")
    for i, (name, bank) in enumerate(gradients.get("banks", {}).items()):
        for k, kind in enumerate(kinds):
            values = [p["cosine"] for p in bank["pairs"] if p["kind"] == kind]
            third.scatter([k + 0.2 * i] * len(values), values, s=8, color=f"C{i}", alpha=0.5)
            if values:
                third.hlines(sum(values) / len(values), k + 0.2 * i - 0.08, k + 0.2 * i + 0.08, color=f"C{i}",
                             label=name if k == 0 else None)  # fmt: skip
    if gradients.get("banks"):
        third.axhline(0.0, color="0.6", linewidth=0.6)
        third.set_xticks([k + 0.1 for k in range(len(kinds))], ["one LLM", "LLMs of one type", "other types"])
        third.set(ylabel="cosine of generator gradients (bar: mean)", title="do the LLMs pull the generators alike?")
        third.legend(fontsize="small", title="bank")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help="LABEL=PATH or PATH of each LLM (at least 2)")
    parser.add_argument("--workdir", required=True, type=Path, help="answer cache and meta-training checkpoint")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--learned_parameters", type=Path, default=REPO_ROOT / "learned_parameters")
    parser.add_argument("--metaparameters", type=Path, default=REPO_ROOT / "metaparameters.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jailbreaks_per_llm", type=int, default=5)
    parser.add_argument("--never", type=int, default=10, help="templates assigned to no LLM")
    parser.add_argument("--examples_per_jailbreak", type=int, default=16)
    parser.add_argument("--train_prompts", type=int, default=48)
    parser.add_argument("--validation_prompts", type=int, default=2)
    parser.add_argument("--test_prompts", type=int, default=4)
    parser.add_argument("--answer_tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="training batches per LLM (the compute budget)")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=None, help="adapter rank (default: the metaparameters')")
    parser.add_argument("--max_tokens", type=int, default=None,
                        help="context of every example (default: the metaparameters'); a longer one lets more "
                        "templates fit every tokenizer")  # fmt: skip
    parser.add_argument("--lora_lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3],
                        help="LoRA learning rates; each LoRA row takes the best on validation prompts")  # fmt: skip
    parser.add_argument("--gradient_batches", type=int, default=2,
                        help="batches per LLM whose generator gradients are compared (with the telelora row; "
                        "0: none)")  # fmt: skip
    parser.add_argument("--checkpoint_interval", type=int, default=25)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the (row, LLM) results of --out, and merge in those other processes write there",
    )
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="the rows this process measures")
    parser.add_argument("--llms", nargs="+", default=None, help="labels of the LLMs this process measures (all)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    try:
        meta = metaparameters.load(args.metaparameters, REPO_ROOT / "metaparameters_schema.json")
        args.rank = args.rank or meta.rank
        args.max_tokens = args.max_tokens or meta.max_tokens
        meta = dataclasses.replace(meta, rank=args.rank, max_tokens=args.max_tokens)
        if args.steps < 1 or args.batch_size < 1 or args.examples_per_jailbreak < 1 or args.test_prompts < 1:
            raise TeleLoRAError("--steps, --batch_size, --examples_per_jailbreak, --test_prompts must be at least 1")
        if args.gradient_batches < 0:
            raise TeleLoRAError("--gradient_batches must be 0 (none) or more")
        llms = parse_models(args.models)
        if len(llms) < 2:
            raise TeleLoRAError("--models: synergy needs at least 2 LLMs")
        unknown = sorted(set(args.llms or []) - {m.label for m in llms})
        if unknown:
            raise TeleLoRAError(f"--llms: {unknown} are not labels of --models")
        texts = load_texts(args.learned_parameters)
        if not texts.jailbreak_templates:
            raise TeleLoRAError(f"{args.learned_parameters} ships no jailbreak templates")
        args.models = [f"{m.label}={m.path.resolve()}" for m in llms]
        settings = _settings(args)
        previous = json.loads(args.out.read_text()) if args.resume and args.out.is_file() else None
        if previous is not None and previous["settings"] != settings:
            raise TeleLoRAError(f"--resume: {args.out} was measured with other settings; use a new --out")
        tokenizers = {m.label: modelio.load_tokenizer(m.path) for m in llms}
        plan = make_plan(llms, texts, tokenizers, args, meta.max_tokens - args.answer_tokens)
    except (TeleLoRAError, OSError, ValueError) as err:
        raise SystemExit("error: " + " ".join(str(err).split())) from err

    device, _ = modelio.pick_device_dtype(meta.device, meta.dtype)
    torch.manual_seed(args.seed)
    answers = {m.label: answers_of(m, plan, meta, args, device) for m in llms}
    datas = {m.label: build_data(m, llms, plan, answers, tokenizers[m.label], meta.max_tokens) for m in llms}
    rows: list[dict] = previous["rows"] if previous else []
    records: list[dict] = previous.get("meta_training", []) if previous else []
    gradients: dict = previous.get("gradients", {}) if previous else {}
    done = {(r["row"], r["llm"]) for r in rows}
    mine = {(name, m.label) for name in args.rows for m in llms if args.llms is None or m.label in args.llms}

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out.with_name(args.out.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # processes sharing --out: read, merge and write one at a time
            if args.resume and args.out.is_file():
                on_disk = json.loads(args.out.read_text())
                if on_disk["settings"] == settings:
                    rows.extend(r for r in on_disk["rows"] if (r["row"], r["llm"]) not in done)
                    done.update((r["row"], r["llm"]) for r in on_disk["rows"])
                    records[:] = records or on_disk.get("meta_training", [])
                    gradients.update(gradients or on_disk.get("gradients", {}))
            summary = summarise(rows)
            payload = {"settings": settings, "metaparameters": meta.to_dict(), "device": str(device),
                       "plan": {"templates": plan.templates, "assigned": plan.assigned, "never": plan.never},
                       "rows": rows, "summary": summary, "synergy": synergy(summary, rows), "paper": PAPER,
                       "meta_training": records, "gradients": gradients}  # fmt: skip
            atomic_write_text(args.out, json.dumps(payload, indent=1))
            plot(summary, rows, records, gradients, args.out.with_suffix(".png"))

    def record(name: str, llm: LLM, figures: dict, seconds: float, extra: dict | None = None) -> None:
        rows.append({"row": name, "llm": llm.label, **figures, "seconds": round(seconds, 1), **(extra or {})})
        done.add((name, llm.label))
        write()

    meta32 = dataclasses.replace(meta, dtype="float32")  # every adapter is trained and applied in float32
    for name in ("none", "model_specific_lora", "model_agnostic_lora"):
        for llm in tqdm(llms, desc=name):
            if (name, llm.label) in done or (name, llm.label) not in mine:
                continue
            start = time.time()
            loaded = load_llm(llm.path, meta32, device)
            tokenizer, data = tokenizers[llm.label], datas[llm.label]
            if name == "none":
                record(name, llm, measure(loaded, tokenizer, data, {}, None, args, device), time.time() - start)
                continue
            examples = data.own if name == "model_specific_lora" else data.agnostic
            seed = args.seed + zlib.crc32(llm.label.encode())
            trained = {
                lr: train_lora(loaded, examples, pad_id(tokenizer), args, lr, seed, device) for lr in args.lora_lrs
            }
            scores = {lr: validation_ppl(loaded, tokenizer, data, a, args, device) for lr, a in trained.items()}
            best = min(scores, key=scores.get)
            extra = {"lr": best, "validation_ppl": {str(k): v for k, v in scores.items()}, "examples": len(examples)}
            record(name, llm, measure(loaded, tokenizer, data, trained[best], None, args, device),
                   time.time() - start, extra)  # fmt: skip

    def mitigated(llm: LLM, bank: GeneratorBank, ranges: dict) -> tuple[dict, float]:
        """Test figures of ``llm`` with the generators applied as ``mitigate`` does; the guard's scale."""
        loaded, tokenizer = load_llm(llm.path, meta32, device), tokenizers[llm.label]
        mitigation = plan_mitigation(loaded.model, tokenizer, bank, texts, meta, ranges)
        figures = measure(loaded, tokenizer, datas[llm.label], None, mitigation.delta, args, device)
        return figures, mitigation.drift_guard.scale

    for llm in tqdm(llms, desc="model_specific_telelora"):
        if ("model_specific_telelora", llm.label) in done or ("model_specific_telelora", llm.label) not in mine:
            continue
        start = time.time()
        checkpoint_path = args.workdir / f"meta_training-{llm.label}.pt"
        bank, ranges, trained = meta_train([llm], datas, meta32, args, device, checkpoint_path)
        figures, scale = mitigated(llm, bank, ranges)
        record("model_specific_telelora", llm, figures, time.time() - start,
               {"guard_scale": scale, "losses": [r["loss"] for r in trained]})  # fmt: skip
    if any(("telelora", m.label) not in done for m in llms if ("telelora", m.label) in mine):
        start = time.time()
        bank, ranges, trained = meta_train(llms, datas, meta32, args, device, args.workdir / "meta_training.pt")
        records[:] = trained
        per_llm = (time.time() - start) / len(llms)
        for llm in llms:
            if ("telelora", llm.label) in done or ("telelora", llm.label) not in mine:
                continue
            tick = time.time()
            figures, scale = mitigated(llm, bank, ranges)
            record("telelora", llm, figures, per_llm + time.time() - tick, {"guard_scale": scale})

    measures_telelora = all(("telelora", m.label) in mine for m in llms)
    if measures_telelora and args.gradient_batches > 0 and gradients.get("batches") != args.gradient_batches:
        bank = final_bank(llms, meta32, args, device)
        if bank is not None:
            banks = {"initial": initial_bank(meta32, device), "final": bank}
            gradients.clear()
            gradients.update(gradient_agreement(llms, datas, meta32, args, device, banks))
    write()  # takes in what other processes wrote to --out meanwhile
    summary = summarise(rows)
    print(f"jailbreak synergy: {len(llms)} LLMs, {args.jailbreaks_per_llm} jailbreaks each, {args.never} never "
          f"assigned; {args.steps} batches of {args.batch_size} per LLM, rank {args.rank}; on {device}")  # fmt: skip
    print(format_table(summary, args.markdown))
    verdict = synergy(summary, rows)
    for name, stat in verdict["telelora_minus"].items():
        print(f"TeleLoRA - {name}, other LLMs' jailbreaks, paired over {stat['n']} LLMs: "
              f"{stat['mean']:+.2f} [{stat['low']:+.2f}, {stat['high']:+.2f}]")  # fmt: skip
    if verdict["decided"]:
        print(
            f"synergy (TeleLoRA below both LoRA rows on other LLMs' jailbreaks, intervals apart): {verdict['synergy']}"
        )
    for name, bank in gradients.get("banks", {}).items():
        means = ", ".join(f"{k} {v:+.2f}" for k, v in bank["mean_cosine"].items() if v is not None)
        print(f"generator gradients, {name} bank: mean cosine {means}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
