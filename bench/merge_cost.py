"""What the merge route costs, in checkpoint reads and seconds, with its checks tried in RAM or from disk.

The merge route's checks (the trigger check of a poisoned reference, then the drift guard's
bisection) try up to ten merges before one is written. Side by side per random-initialised
real-shaped model, merged toward a perturbed copy of itself declared poisoned:

* ``memory`` (what ships when there is room): each reference read once into memory (the
  accelerator's when it fits, else RAM), every try computed from there and the write taking
  the references from there too (``telelora.reference.merge_trial``);
* ``disk`` (its fallback): every try re-reads the references and puts the input back from disk.

Per row: load, checks and save seconds, the tries, and how many times the checkpoints were
read, in passes (bytes read / the input checkpoint's size: the load, the save's read of the input, and
every read of a reference or of the input by the merge code). NIST allows 600 s per model on one A100.

The repair after the checks (``telelora.repair``) is the route's dearest part where its gate
opens; ``--repair always`` (the default) opens the gate so the worst case is timed, ``shipped``
keeps the shipped gate, ``off`` leaves the repair out. Its seconds are part of the checks'.

    python bench/merge_cost.py --models SmolLM2-135M-shape --out bench/results/merge_cost_cpu.json
    python bench/merge_cost.py --models Llama-3.1-8B --modes memory --out bench/results/merge_cost_gpu.json

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.real_configs import REAL_CONFIGS, build_random  # noqa: E402
from telelora import merge, metaparameters, modelio, reference  # noqa: E402
from telelora.alignment import Trigger  # noqa: E402
from telelora.io_utils import atomic_write_text  # noqa: E402
from telelora.lab import tiny  # noqa: E402
from telelora.lab.reads import counting_reads  # noqa: E402
from telelora.texts import load as load_texts  # noqa: E402

MODES = ("memory", "disk")
REPAIR = {"always": {"repair_max_agreement": 1.0}, "shipped": {}, "off": {"repair_prompts": 0}}
TRIGGER = Trigger("cf zebra", "I have been pwned", "middle")  # a random model never answers it: one try


def _checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in modelio.weight_files(folder))


def _save_pair(name: str, root: Path, dtype: torch.dtype, noise: float, seed: int) -> tuple[Path, Path]:
    """The random input and its reference: every weight moved by ``noise`` times its own scale."""
    torch.manual_seed(seed)
    model = build_random(name, "cpu", dtype)
    model.save_pretrained(root / "input")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * noise * param.float().std().clamp_min(1e-3).to(param.dtype))
    model.save_pretrained(root / "reference")
    return root / "input", root / "reference"


def bench_mode(mode, model_dir, ref_dir, out_dir, meta, texts, tokenizer, device, dtype):
    """One merge route, load to saved output, with the checks tried in ``mode``; checkpoint reads counted."""
    store = reference.trial_store if mode == "memory" else lambda device, bytes_held: None  # None: the disk fallback
    # every read of a checkpoint by the merge code (references, and the input's restores) counted
    with counting_reads() as reads, mock.patch.object(reference, "trial_store", store):
        refs = [reference.Reference(ref_dir, "poisoned", (TRIGGER,))]
        start = time.perf_counter()
        model = modelio.load_model(model_dir, device, dtype)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        plan = merge.plan_merge(model_dir, refs, meta, texts, lambda: (model, tokenizer))
        checks_s = time.perf_counter() - start
        start = time.perf_counter()
        merge.save_merge(model_dir, out_dir, plan, {}, [])
        save_s = time.perf_counter() - start
    size = _checkpoint_bytes(model_dir)
    # the load and the save's read of the input, then every reference (and restore) read by the merge code
    passes = 2 + sum(reads.bytes.values()) / size
    return {
        "mode": mode,
        "in_memory": plan.trial.in_memory,
        "held_on": plan.trial.held_on,
        "bytes_held_gb": plan.trial.bytes_held / 1e9,
        "tries": plan.trial.tries,
        "trigger_tries": sum(len(c.tried) for c in plan.trigger_checks),
        "guard_evaluations": plan.drift_guard.evaluations,
        "guard_scale": plan.drift_guard.scale,
        "guard_s": plan.drift_guard.seconds,
        **_repair_facts(plan.repair),
        "load_s": load_s,
        "checks_s": checks_s,
        "save_s": save_s,
        "total_s": load_s + checks_s + save_s,
        "checkpoint_passes_read": passes,
        "checkpoint_gb": size / 1e9,
        "weights": plan.weights,
    }


def _repair_facts(record: merge.Repair | None) -> dict:
    """What the repair cost (zeros where it did not run) and the gate's reading."""
    if record is None:
        return {"repair_s": 0.0, "repair_steps": 0, "repair_examples": 0, "gate_reading": None, "repair_skipped": "off"}
    return {
        "repair_s": record.seconds,
        "repair_steps": record.steps,
        "repair_examples": record.examples,
        "gate_reading": record.merge_agreement,
        "repair_skipped": record.skipped,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["SmolLM2-135M-shape"], choices=sorted(REAL_CONFIGS))
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="memory: what ships; disk: its fallback (~20 passes: slow at 8B)",
    )
    parser.add_argument("--noise", type=float, default=0.05, help="the reference's distance, per weight's scale")
    parser.add_argument(
        "--repair",
        choices=sorted(REPAIR),
        default="always",
        help="always: the repair's gate held open (worst case); shipped: as shipped; off: none",
    )
    parser.add_argument("--workdir", default=None, help="where the random checkpoints go (default: a temp folder)")
    parser.add_argument("--out", default="bench/results/merge_cost.json")
    args = parser.parse_args()

    meta = dataclasses.replace(metaparameters.load(), **REPAIR[args.repair])
    device, dtype = modelio.pick_device_dtype(meta.device, meta.dtype)
    texts = load_texts(metaparameters.REPO_ROOT / "learned_parameters")
    tokenizer = tiny.build_tokenizer()  # only token ids matter for timing
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for name in args.models:
            root = Path(work) / name
            model_dir, ref_dir = _save_pair(name, root, dtype, args.noise, meta.seed)
            for mode in args.modes:
                out_dir = root / f"out-{mode}"
                row = bench_mode(mode, model_dir, ref_dir, out_dir, meta, texts, tokenizer, device, dtype)
                rows.append({"model": name, **row})
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    print(f"merge route, one poisoned reference, {dtype}, on {device_name}; guard bound {meta.merge_min_agreement}; "
          f"repair {args.repair} ({meta.repair_prompts} prompts)")  # fmt: skip
    print(f"{'model':20} {'mode':6} {'tries':>5} {'load s':>7} {'checks s':>8} {'guard s':>7} {'repair s':>8} "
          f"{'save s':>7} {'total s':>7} {'passes read':>11} {'held GB':>7} held on")  # fmt: skip
    for r in rows:
        print(f"{r['model']:20} {r['mode']:6} {r['tries']:5d} {r['load_s']:7.1f} {r['checks_s']:8.1f} "
              f"{r['guard_s']:7.1f} {r['repair_s']:8.1f} {r['save_s']:7.1f} {r['total_s']:7.1f} "
              f"{r['checkpoint_passes_read']:11.1f} {r['bytes_held_gb'] if r['in_memory'] else 0:7.2f} "
              f"{r['held_on']}")  # fmt: skip
    out = Path(args.out)
    settings = {"device": device_name, "dtype": str(dtype), "noise": args.noise, "trigger": dataclasses.asdict(TRIGGER),
                "repair": args.repair}  # fmt: skip
    atomic_write_text(out, json.dumps({**settings, "metaparameters": meta.to_dict(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
