"""Memory and time of one ``configure`` iteration against a plain PEFT LoRA step.

Side by side in one run, per random-initialised real-shaped LLM and on the same batch
(``--batch`` sequences of ``--seq`` tokens, loss on the last ``--answer_tokens``):

* a plain PEFT LoRA fine-tune step: rank ``rank`` on every adapted linear layer,
  gradient checkpointing, AdamW;
* one TeleLoRA meta-training iteration (``configure.meta_step``): generate every layer's
  adapter, LLM forward-backward to dL/dU, dL/dV, one generator re-forward per layer,
  AdamW on the generators; plus the generators' own share (all layers forward without
  autograd, and forward + backward one layer at a time).

Peak memory is the accelerator's allocator peak on a GPU, the process's peak resident
set on a CPU (reset between measurements through /proc/self/clear_refs). Times are
medians over ``--repeats`` after one warm-up.

    python bench/configure_memory.py --models Llama-3.2-1B Qwen2.5-1.5B Gemma-2-2B Phi-3.5-mini Llama-3.1-8B \
        --metaparameters bench/metaparameters_paper.json --out bench/results/configure_memory_gpu.json
    python bench/configure_memory.py --models SmolLM2-135M-shape --repeats 1 --warmup 0   # CPU-sized

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.real_configs import REAL_CONFIGS, build_random  # noqa: E402
from telelora import alignment, configure, metaparameters, modelio  # noqa: E402
from telelora.architectures import find_adapted_layers  # noqa: E402
from telelora.distributed import World  # noqa: E402
from telelora.errors import MetaparameterError  # noqa: E402
from telelora.generator import GeneratorBank  # noqa: E402


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass


def _peak_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _measure(fn, device, repeats: int, warmup: int) -> tuple[float, float]:
    """(median seconds, peak GiB) of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _reset_peak(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), _peak_gib(device)


def _batch(vocab: int, batch: int, seq: int, answer_tokens: int, device) -> tuple[list, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(batch):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        labels = [alignment.IGNORE_INDEX] * (seq - answer_tokens) + ids[seq - answer_tokens :]
        examples.append(alignment.Example(ids, labels))
    return examples, alignment.collate(examples, 0, device)


def measure_configure(model, layers, examples, meta, args, device) -> dict:
    """One meta-training iteration, and the generators' share of it."""
    torch.manual_seed(0)
    bank = GeneratorBank.from_metaparameters(meta).to(device)
    with torch.no_grad():  # a non-zero V channel, so the adapters really act
        for generator in bank.generators.values():
            generator.net.output_layer.fan_out.weight.normal_(0.0, 0.05)
    bank.set_graph_budget()
    acts = {layer.name: torch.randn(meta.num_reference_texts, layer.in_features) for layer in layers}
    item = configure.TrainingModel(Path("bench"), acts, examples, [], 0, type(model).__name__)
    llm = configure.LoadedModel(model, layers, 0)
    optimizer = torch.optim.AdamW(bank.parameters(), lr=meta.learning_rate)

    def iteration():
        configure.meta_step(bank, optimizer, [(item, llm, examples)], meta, device, World())

    def generators_forward():
        with torch.no_grad():
            for layer in layers:
                bank(layer.projection_type, acts[layer.name].to(device), layer.depth, meta.rank)

    def generators_forward_backward():
        for layer in layers:
            u, v = bank(layer.projection_type, acts[layer.name].to(device), layer.depth, meta.rank)
            (u.sum() + v.sum()).backward()

    seconds, peak = _measure(iteration, device, args.repeats, args.warmup)
    row = {"configure_step_s": seconds, "configure_peak_gib": peak}
    if args.breakdown:
        parts = {"generators_forward_s": generators_forward, "generators_f+b_s": generators_forward_backward}
        for key, fn in parts.items():
            row[key] = _measure(fn, device, args.repeats, args.warmup)[0]
    return row


def measure_lora(model, layers, inputs, meta, args, device) -> dict:
    """A plain PEFT LoRA step (rank ``meta.rank``, the same layers, AdamW); the base model
    is given back unchanged afterwards."""
    from peft import LoraConfig, get_peft_model

    suffixes = sorted({layer.name.rsplit(".", 1)[-1] for layer in layers})
    config = LoraConfig(r=meta.rank, lora_alpha=meta.rank, lora_dropout=0.0, target_modules=suffixes)
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=meta.learning_rate)

    def step():
        peft_model.train()
        alignment.answer_loss(peft_model, inputs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = _measure(step, device, args.repeats, args.warmup)
    peft_model.unload()
    return {"lora_step_s": seconds, "lora_peak_gib": peak}


def bench_model(name: str, meta, args, device, dtype) -> dict:
    model = build_random(name, device, dtype)
    modelio.enable_checkpointing(model)
    layers = find_adapted_layers(model, meta.target_projections)
    examples, inputs = _batch(model.config.vocab_size, args.batch, args.seq, args.answer_tokens, device)
    cfg = measure_configure(model, layers, examples, meta, args, device)
    lora = measure_lora(model, layers, inputs, meta, args, device)
    return {
        "model": name,
        "layers_adapted": len(layers),
        **lora,
        **cfg,
        "time_ratio": cfg["configure_step_s"] / lora["lora_step_s"],
        "memory_ratio": cfg["configure_peak_gib"] / lora["lora_peak_gib"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["SmolLM2-135M-shape"], choices=sorted(REAL_CONFIGS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--answer_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (CUDA kernels, allocator)")
    parser.add_argument(
        "--breakdown", action=argparse.BooleanOptionalAction, default=True, help="also time the generators alone"
    )
    parser.add_argument("--out", default="bench/results/configure_memory.json")
    parser.add_argument(
        "--metaparameters",
        default=None,
        help="metaparameters JSON (default: the shipped one, which sets the generator size)",
    )
    args = parser.parse_args()

    try:
        meta = metaparameters.load(args.metaparameters)
    except MetaparameterError as err:
        sys.exit(f"error: {err}")
    device, dtype = modelio.pick_device_dtype(meta.device, meta.dtype)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    rows = []
    for name in args.models:
        rows.append(bench_model(name, meta, args, device, dtype))
        print(json.dumps(rows[-1]), flush=True)

    print(
        f"configure iteration vs plain PEFT LoRA step, rank {meta.rank}, batch {args.batch}x{args.seq} "
        f"(loss on {args.answer_tokens}), {dtype}, on {device_name} (medians of {args.repeats})"
    )
    print(
        f"{'model':20} {'layers':>6} {'LoRA s':>8} {'LoRA GiB':>9} {'cfg s':>8} {'cfg GiB':>8} "
        f"{'time x':>7} {'mem x':>6} {'gen fwd s':>9} {'gen f+b s':>9}"
    )
    nan = float("nan")
    for r in rows:
        print(
            f"{r['model']:20} {r['layers_adapted']:6d} {r['lora_step_s']:8.3f} {r['lora_peak_gib']:9.2f} "
            f"{r['configure_step_s']:8.3f} {r['configure_peak_gib']:8.2f} {r['time_ratio']:7.2f} "
            f"{r['memory_ratio']:6.2f} {r.get('generators_forward_s', nan):9.3f} "
            f"{r.get('generators_f+b_s', nan):9.3f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("batch", "seq", "answer_tokens", "repeats", "warmup", "breakdown")}
    payload = {"device": device_name, "dtype": str(dtype), "settings": settings, "metaparameters": meta.to_dict()}
    out.write_text(json.dumps({**payload, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
