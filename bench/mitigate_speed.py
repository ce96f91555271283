"""Time and memory of ``mitigate`` per phase on random-initialised real-shaped LLMs.

Side by side in one run, per model: a plain forward pass over the same reference texts
(the floor any activation-based method pays), activation collection, adapter generation
and merging, with peak accelerator memory. NIST allows 600 s per model on one A100.

    python bench/mitigate_speed.py --models Llama-3.2-1B Llama-3.1-8B --out bench/results/mitigate_speed_gpu.json
    python bench/mitigate_speed.py --models SmolLM2-135M-shape      # CPU-sized

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.real_configs import REAL_CONFIGS, build_random  # noqa: E402
from telelora import activations, metaparameters, modelio  # noqa: E402
from telelora.adapters import LowRankDelta  # noqa: E402
from telelora.architectures import find_adapted_layers  # noqa: E402
from telelora.chat import pad_id, padded, prompt_ids  # noqa: E402
from telelora.generated import generate_adapters  # noqa: E402
from telelora.lab import tiny  # noqa: E402
from telelora.learned import load_bank  # noqa: E402
from telelora.texts import load as load_texts  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench_model(name, meta, bank, tokenizer, texts, device, dtype, repeats):
    model = build_random(name, device, dtype)
    layers = find_adapted_layers(model, meta.target_projections)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    @torch.no_grad()
    def plain_forward():
        decoder = model.get_decoder()
        seqs = [prompt_ids(tokenizer, t)[: meta.max_tokens] for t in texts]
        for start in range(0, len(seqs), meta.activation_batch_size):
            ids, mask = padded(seqs[start : start + meta.activation_batch_size], pad_id(tokenizer), device)
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)

    def collect():
        return activations.collect(
            model,
            tokenizer,
            layers,
            texts,
            meta.activation_tokens,
            meta.activation_batch_size,
            meta.max_tokens,
            meta.seed,
        )

    t_forward, _ = _timed(plain_forward, device, repeats)
    t_collect, _ = _timed(collect, device, repeats)
    t_generate_all, adapters = _timed(
        lambda: generate_adapters(bank, model, tokenizer, layers, texts, meta, meta.seed), device, repeats
    )

    def compose_and_merge():
        delta = LowRankDelta()
        delta.add_step(layers, adapters, 0.0)  # step size 0: the weights stay as they are
        delta.merge(layers)

    t_merge, _ = _timed(compose_and_merge, device, 1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    row = {
        "model": name,
        "layers_adapted": len(layers),
        "plain_forward_s": t_forward,
        "collect_s": t_collect,
        "generate_s": t_generate_all - t_collect,
        "merge_s": t_merge,
        "one_step_s": t_generate_all + t_merge,
        "one_step_over_forward": (t_generate_all + t_merge) / t_forward,
        "peak_gib": peak,
    }
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["SmolLM2-135M-shape"], choices=sorted(REAL_CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/mitigate_speed.json")
    args = parser.parse_args()

    meta = metaparameters.load()
    device, dtype = modelio.pick_device_dtype(meta.device, meta.dtype)
    learned_dir = metaparameters.REPO_ROOT / "learned_parameters"
    bank, _ = load_bank(learned_dir, meta)
    bank.to(device)
    texts = load_texts(learned_dir).reference[: meta.num_reference_texts]
    tokenizer = tiny.build_tokenizer()  # only token ids matter for timing
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    rows = []
    for name in args.models:
        rows.append(bench_model(name, meta, bank, tokenizer, texts, device, dtype, args.repeats))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    header = (
        f"{'model':22} {'layers':>6} {'fwd s':>8} {'collect s':>9} {'gen s':>8} {'merge s':>8} "
        f"{'step/fwd':>8} {'peak GiB':>8}"
    )
    print(f"mitigate, one step, N={meta.num_reference_texts}, {dtype}, on {device_name} (medians of {args.repeats})")
    print(header)
    for r in rows:
        print(
            f"{r['model']:22} {r['layers_adapted']:6d} {r['plain_forward_s']:8.3f} {r['collect_s']:9.3f} "
            f"{r['generate_s']:8.3f} {r['merge_s']:8.3f} {r['one_step_over_forward']:8.1f} {r['peak_gib']:8.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"device": device_name, "dtype": str(dtype), "metaparameters": meta.to_dict(), "rows": rows}, indent=2
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
