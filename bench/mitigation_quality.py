"""Mitigation quality on a local round: TeleLoRA against a change-matched random control.

Per chosen model of a round (``python -m telelora.lab.round_builder``) and per number of
mitigation steps K, side by side on the same prompts and MMLU questions:

* ``none``: the model as built (its ground truth; agreement 1 by definition);
* ``telelora``: ``mitigate`` with the given generators, K steps, drift guard as the
  metaparameters set it;
* ``unguarded``: the same with the drift guard off (no layer bound, no agreement bound);
* ``random``: the same K steps, each layer's adapter replaced by random directions scaled
  so that it moves the layer's reference inputs as far as TeleLoRA's does
  (``|X U^T V|`` equal), unguarded. It changes the model as much and knows nothing: a
  Trojan it removes as well says the generator learned nothing Trojan-specific.

``--set KEY=VALUE ...`` overrides metaparameters (checked against the schema), e.g.
``activation_tokens=user`` (reference activations pooled over the user's text only) or
``guard_min_agreement=0.7``.

ASR, false-trigger rate, MMLU and agreement come from ``evaluate`` (what ``entrypoint.py
test`` measures); Fidelity and strict Fidelity from ``telelora.lab.score``.

    python bench/mitigation_quality.py --round ~/rounds/local-r1 --models id-00000001 id-00000005 \\
        --steps 1 2 --out bench/results/mitigation_quality_cpu.json

Prints a table and writes JSON (atomically, after every model, so a later failure keeps
the finished ones). One thread-bound process per model runs well side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from telelora import metaparameters, modelio  # noqa: E402
from telelora.errors import TeleLoRAError  # noqa: E402
from telelora.io_utils import atomic_write_text  # noqa: E402
from telelora.lab import evaluate, score  # noqa: E402
from telelora.learned import load_bank  # noqa: E402
from telelora.metaparameters import REPO_ROOT  # noqa: E402
from telelora.mitigate import mitigate_model  # noqa: E402
from telelora.texts import load as load_texts  # noqa: E402


class RandomDirections(nn.Module):
    """A generator bank whose adapters point at random but move each layer's reference
    inputs exactly as far as the real generator's adapters do."""

    def __init__(self, bank: nn.Module, seed: int):
        super().__init__()
        self.bank = bank
        self.rng = torch.Generator().manual_seed(seed)

    def forward(self, projection_type: str, activations: torch.Tensor, depth: float, rank: int):
        u, v = self.bank(projection_type, activations, depth, rank)
        u_random, v_random = (torch.randn(t.shape, generator=self.rng).to(t) for t in (u, v))
        x = activations.to(u)
        moved, moved_random = ((x @ a.T @ b).norm() for a, b in ((u, v), (u_random, v_random)))
        scale = (moved / moved_random.clamp_min(1e-30)).sqrt()
        return u_random * scale, v_random * scale


def measure(model_dir: Path, variant: str, steps: int, args, meta, mmlu_rows) -> dict:
    """Mitigate one fresh copy of the model in memory as ``variant`` with K=``steps``; measure it."""
    device, dtype = modelio.pick_device_dtype(meta.device, meta.dtype, model_dir)
    tokenizer = modelio.load_tokenizer(model_dir)
    model = modelio.load_model(model_dir, device, dtype)
    meta = dataclasses.replace(meta, mitigation_steps=steps)
    if variant != "telelora":
        meta = dataclasses.replace(meta, guard_min_agreement=0.0, guard_layer_factor=0.0)
    bank, info = load_bank(args.learned_parameters, meta)
    bank.to(device)
    generator = RandomDirections(bank, meta.seed) if variant == "random" else bank
    start = time.time()
    torch.manual_seed(meta.seed)
    texts = load_texts(args.learned_parameters)
    mitigation = mitigate_model(model, tokenizer, generator, texts, meta, info.get("layer_ranges"))
    seconds = time.time() - start
    prompts = evaluate.load_prompts(model_dir / "test-example-data" / "prompts.json")
    result = evaluate.evaluate(model, tokenizer, prompts, mmlu_rows, args.num_samples, args.batch_size)
    guard = {
        "guard_scale": mitigation.drift_guard.scale,
        "guard_agreement_unscaled": mitigation.drift_guard.agreement_unscaled,
        "layers_shrunk": mitigation.layer_bound.layers_shrunk,
    }
    return {**result, **guard, "mitigate_seconds": round(seconds, 1)}


def bench_model(model_dir: Path, truth: dict, args, meta, mmlu_rows) -> list[dict]:
    unmitigated = {"asr": truth["pre_asr"], "false_trigger_rate": None, "mmlu": truth["pre_mmlu"], "agreement": 1.0}
    rows = [{"model": model_dir.name, "variant": "none", "steps": 0, **unmitigated}]
    for steps in args.steps:
        for variant in args.variants:
            result = measure(model_dir, variant, steps, args, meta, mmlu_rows)
            rows.append({"model": model_dir.name, "variant": variant, "steps": steps, **result})
            print(_format([rows[-1]]), flush=True)
    for row in rows:
        row["fidelity"], row["strict_fidelity"] = score.model_fidelity(
            truth["poisoned"], truth["pre_asr"], truth["pre_mmlu"], row["asr"], row["mmlu"], row["agreement"]
        )
    return rows


def _format(rows: list[dict]) -> str:
    def cell(value) -> str:
        return "   -  " if value is None else f"{value:6.3f}"

    lines = []
    for r in rows:
        values = (r.get(k) for k in ("asr", "false_trigger_rate", "mmlu", "agreement", "fidelity", "strict_fidelity"))
        lines.append(f"{r['model']:<12} {r['variant']:<10} {r['steps']:>2} " + " ".join(cell(v) for v in values))
    return "\n".join(lines)


def _override(meta, assignments: list[str]):
    """``meta`` with ``KEY=VALUE`` assignments (JSON values, bare strings allowed), schema-checked."""
    values = meta.to_dict()
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or key not in values:
            raise TeleLoRAError(f"--set {assignment}: expected KEY=VALUE with KEY a metaparameter")
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw
    schema = json.loads((REPO_ROOT / "metaparameters_schema.json").read_text())
    metaparameters.validate(values, schema, Path("--set"))
    return dataclasses.replace(meta, **{**values, "target_projections": tuple(values["target_projections"])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--round", required=True, type=Path, help="a round folder with models/ and ground truth")
    parser.add_argument("--models", nargs="+", required=True, help="model folder names, e.g. id-00000001")
    parser.add_argument("--steps", nargs="+", type=int, default=[2], help="numbers of mitigation steps K")
    parser.add_argument(
        "--variants", nargs="+", choices=["telelora", "unguarded", "random"], default=["telelora", "random"]
    )
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="metaparameter overrides (JSON)")
    parser.add_argument("--learned_parameters", type=Path, default=REPO_ROOT / "learned_parameters")
    parser.add_argument("--metaparameters", type=Path, default=REPO_ROOT / "metaparameters.json")
    parser.add_argument("--num_samples", type=int, default=100, help="clean and triggered prompts per model")
    parser.add_argument("--mmlu_questions", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if min(args.steps) < 1 or args.num_samples < 1 or args.batch_size < 1 or args.mmlu_questions < 0:
        raise SystemExit("error: --steps, --num_samples, --batch_size must be at least 1, --mmlu_questions at least 0")
    try:  # every input checked before the first (long) mitigation
        meta = metaparameters.load(args.metaparameters, REPO_ROOT / "metaparameters_schema.json")
        meta = _override(meta, args.set)
        load_bank(args.learned_parameters, meta)
        shipped = load_texts(args.learned_parameters).mmlu_rows
        mmlu_rows = evaluate.mmlu_subset(args.mmlu_questions, shipped) if args.mmlu_questions else []
        model_dirs = [args.round / "models" / name for name in args.models]
        for model_dir in model_dirs:
            modelio.check_model_dir(model_dir)
        truths = [score.ground_truth(model_dir) for model_dir in model_dirs]
    except TeleLoRAError as err:
        raise SystemExit("error: " + " ".join(str(err).split())) from err
    if args.out:
        try:
            modelio.check_output_dir(args.out.parent)
        except TeleLoRAError as err:
            raise SystemExit(f"error: --out {args.out}: its folder cannot be written") from err

    print("model        variant     K    ASR  false    MMLU  agree    Fid strict")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}
    rows = []
    for model_dir, truth in zip(model_dirs, truths, strict=True):
        rows += bench_model(model_dir, truth, args, meta, mmlu_rows)
        if args.out:
            payload = {
                "settings": settings,
                "metaparameters": meta.to_dict(),
                "threads": torch.get_num_threads(),
                "rows": rows,
            }
            atomic_write_text(args.out, json.dumps(payload, indent=2))
    print("\n" + _format(rows))
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
