"""How much of a Trojan's meta-training loss can the generators' first step remove, and at what
cost to the models that need no change?

Fresh generators are the identity (V = 0), where only the V channel's output weights get a
gradient. This bench takes the full-batch gradient of configure's distillation loss over
every example of the models that need a change (identity loss above ``NEEDS_CHANGE``: the
Trojans), then walks along ``-g / |g|`` by ``eta`` (a parameter-space distance) and measures
every model's monitor loss (mean over all its answer tokens, configure's ``monitor_losses``).
The walk is repeated with the gradient restricted to one projection type's generator.

Read it as a second-order picture: a Trojan's loss falls at first (``-a eta``) while every
model pays ``~ c eta^2 / 2``; the best first step gains ``a^2 / 2c``. The line
``adamw_step`` is how far one AdamW update of ``--learning_rate`` moves the
parameters (each one with a gradient by ~lr, whatever its gradient's size).

    OMP_NUM_THREADS=1 python bench/first_step.py --models_dirpath ~/exp/train \\
        --metaparameters ~/exp/meta.json --scratch ~/exp/scratch --out bench/results/first_step_cpu.json

Only train/validation models are for looking at (the test split is never used for choices:
a farm model of the test split is refused); the data come from, or go to, configure's
scratch cache.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from telelora import configure as conf  # noqa: E402
from telelora import modelio  # noqa: E402
from telelora.errors import TeleLoRAError  # noqa: E402
from telelora.generator import GeneratorBank  # noqa: E402
from telelora.io_utils import atomic_write_text  # noqa: E402
from telelora.metaparameters import PROJECTION_TYPES, REPO_ROOT  # noqa: E402
from telelora.metaparameters import load as load_meta  # noqa: E402
from telelora.texts import load as load_texts  # noqa: E402

DEFAULT_ETAS = (1e-5, 3e-5, 1e-4, 3e-4)


def identity_gradient(bank: GeneratorBank, items, pool, meta, device) -> dict[str, torch.Tensor]:
    """``d/dtheta`` of the mean over models of each model's monitor loss (its mean over all
    its answer tokens), at ``bank``."""
    total: dict[str, torch.Tensor] = {}
    for item in items:
        llm = pool.get(item.model_dir)
        tokens = sum(len(e.answer) for e in item.examples)
        for start in range(0, len(item.examples), meta.train_batch_size):
            batch = item.examples[start : start + meta.train_batch_size]
            bank.zero_grad(set_to_none=True)
            conf.train_step(bank, item, llm, batch, meta, device)  # the gradient of the batch's token mean
            weight = sum(len(e.answer) for e in batch) / tokens / len(items)
            for k, p in bank.named_parameters():
                if p.grad is not None:
                    total[k] = total.get(k, 0) + weight * p.grad
    return total


@torch.no_grad()
def walk(bank, start: dict, direction: dict, etas, items, pool, meta, device) -> list[dict]:
    """Monitor losses at ``start - eta * direction / |direction|`` for each eta."""
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in direction.values()))
    rows = []
    for eta in etas:
        for k, p in bank.named_parameters():
            p.copy_(start[k] - eta * direction[k] / norm if k in direction else start[k])
        rows.append({"eta": eta, "losses": conf.monitor_losses(bank, items, pool, meta, device)})
    bank.load_state_dict(start)
    return rows


def summarise(identity: dict[str, float], walks: dict[str, list[dict]], trojans: list[str]) -> dict:
    """Per direction and eta: the Trojans' median relative loss change and the clean models'
    largest loss; per direction, the best eta for the Trojans."""
    clean = [m for m in identity if m not in trojans]
    table = {}
    for name, rows in walks.items():
        per_eta = []
        for row in rows:
            change = [row["losses"][m] / identity[m] - 1 for m in trojans]
            per_eta.append(
                {
                    "eta": row["eta"],
                    "trojan_relative_change": statistics.median(change),
                    "clean_loss": max((row["losses"][m] for m in clean), default=float("nan")),
                }
            )
        best = min(per_eta, key=lambda r: r["trojan_relative_change"])
        table[name] = {"per_eta": per_eta, "best": best}
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models_dirpath", type=Path, required=True, help="train-split model folders (a round)")
    parser.add_argument("--metaparameters", type=Path, default=REPO_ROOT / "metaparameters.json")
    parser.add_argument("--scratch", type=Path, required=True, help="configure's scratch folder (data cache)")
    parser.add_argument("--etas", type=float, nargs="+", default=list(DEFAULT_ETAS))
    parser.add_argument("--types", nargs="+", default=["all", *PROJECTION_TYPES], help="'all' and/or projection types")
    parser.add_argument(
        "--needs_change", type=float, default=conf.NEEDS_CHANGE, help="identity loss above which a model is a Trojan"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if any(not eta > 0 for eta in args.etas):
        raise SystemExit("error: every --etas value must be above 0")
    unknown = set(args.types) - {"all", *PROJECTION_TYPES}
    if unknown:
        raise SystemExit(f"error: --types {sorted(unknown)}: use 'all' or {list(PROJECTION_TYPES)}")
    try:
        meta = load_meta(args.metaparameters, REPO_ROOT / "metaparameters_schema.json")
        texts = load_texts(REPO_ROOT / "learned_parameters")
        device = torch.device("cpu")
        pool = conf.ModelPool(meta, device, 8 * 2**30)
        items = []
        for model_dir in conf.list_model_dirs(args.models_dirpath, None, "--models_dirpath"):
            if (modelio.round_config(model_dir).get("farm") or {}).get("split") == "test":
                raise TeleLoRAError(f"{model_dir} is a test-split model: only train/validation are looked at")
            item, loaded = conf.prepare(
                model_dir, meta, texts, conf.seed_for(model_dir, meta.seed), device, args.scratch
            )
            items.append(item)
            pool.offer(model_dir, loaded)
    except TeleLoRAError as err:
        raise SystemExit(f"error: {err}") from None
    torch.manual_seed(meta.seed)
    bank = GeneratorBank.from_metaparameters(meta)
    start = {k: v.clone() for k, v in bank.state_dict().items()}
    identity = conf.monitor_losses(None, items, pool, meta, device)
    trojans = [m for m, loss in identity.items() if loss > args.needs_change]
    if not trojans:
        raise SystemExit(
            f"error: no model of {args.models_dirpath} needs a change (identity loss > {args.needs_change})"
        )
    tick = time.time()
    grad = identity_gradient(bank, [i for i in items if i.model_dir.name in trojans], pool, meta, device)
    grad_seconds = time.time() - tick
    nonzero = sum(int((g != 0).sum()) for g in grad.values())
    walks = {}
    for name in args.types:
        direction = {k: g for k, g in grad.items() if name == "all" or k.startswith(f"generators.{name}.")}
        walks[name] = walk(bank, start, direction, args.etas, items, pool, meta, device)
        print(f"{name}: " + "  ".join(f"eta {r['eta']:g} {r['losses']}" for r in walks[name]), flush=True)
    table = summarise(identity, walks, trojans)
    per_type_norm = {
        t: math.sqrt(sum(float(g.pow(2).sum()) for k, g in grad.items() if k.startswith(f"generators.{t}.")))
        for t in PROJECTION_TYPES
    }
    # AdamW's first update moves each parameter with a gradient by ~lr (m / sqrt(v) = sign g);
    # from the second on, every parameter has one
    adamw = meta.learning_rate * math.sqrt(nonzero)
    adamw_later = meta.learning_rate * math.sqrt(sum(p.numel() for p in bank.parameters()))
    print(f"identity losses: {identity}; Trojans: {trojans}")
    print(f"gradient norm per projection type: { {t: round(v, 3) for t, v in per_type_norm.items()} }")
    print(
        f"AdamW at lr {meta.learning_rate:g}: the first update moves {nonzero} parameters"
        f" a distance {adamw:.3g}, later ones {adamw_later:.3g}"
    )
    header = (
        "| direction | "
        + " | ".join(f"eta {e:g}" for e in args.etas)
        + " | best eta | Trojan loss change | clean loss there |"
    )
    print(header)
    print("|" + "---|" * (len(args.etas) + 4))
    for name, entry in table.items():
        cells = [f"{100 * r['trojan_relative_change']:+.2f} % / {r['clean_loss']:.1e}" for r in entry["per_eta"]]
        best = entry["best"]
        print(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {best['eta']:g} | {100 * best['trojan_relative_change']:+.2f} % | {best['clean_loss']:.1e} |"
        )
    if args.out:
        payload = {
            "settings": {k: str(v) for k, v in vars(args).items()},
            "identity": identity,
            "trojans": trojans,
            "gradient_norm_per_type": per_type_norm,
            "gradient_seconds": grad_seconds,
            "adamw_step": {
                "learning_rate": meta.learning_rate,
                "first_moves": nonzero,
                "first": adamw,
                "later": adamw_later,
            },
            "summary": table,
            "walks": walks,
        }
        atomic_write_text(args.out, json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
