"""How much repair does a merge need? The repair's data and passes, at one merge, per model.

The repair after a merge (``telelora.repair``) distils the input's own answers to the first
``repair_prompts`` shipped prompts back into the merged model, one pass. On full fine-tunes it
gives back 4-11 points of agreement and leaves clean models at 0.84-0.90 of the input's answers
(docs/benches.md), short of the 0.90 the issue asks. This bench plans the merge of each model as
``mitigate`` does (route, trigger check, drift guard; the repair left out), reads the input's
teacher answers once for the largest prompt count asked, then trains each variant's repair
from the same merge, whatever the gate (``repair_max_agreement``) would say, and measures ASR,
false triggers and agreement with the input on the model's round prompts
(``test-example-data/prompts.json``), the merge alone beside it. A variant is
``PROMPTSxEPOCHS``: the first PROMPTS shipped alignment prompts, EPOCHS passes (``0x0``: the
merge alone). Everything else is the metaparameters' (``--set`` overrides).

    OMP_NUM_THREADS=1 python bench/repair_budget.py --pairs ~/ffv18/models/id-00000018:~/ffref \\
        --variants 0x0 256x1 256x3 1024x1 --num_samples 40 --out bench/results/repair_budget_validation.json

Each pair is MODEL_DIR:ROUND_DIR (the training round handed to ``mitigate``). Choose on
validation models only. Rows are written after each variant; a re-run keeps them (resumable).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gate_readings import parse_pair  # noqa: E402
from bench.mitigation_quality import bootstrap_mean, override_metaparameters  # noqa: E402
from telelora import merge, metaparameters, modelio, reference, repair, route  # noqa: E402
from telelora.architectures import find_adapted_layers  # noqa: E402
from telelora.chat import agreement_fractions  # noqa: E402
from telelora.errors import TeleLoRAError  # noqa: E402
from telelora.io_utils import atomic_write_text  # noqa: E402
from telelora.lab import evaluate  # noqa: E402
from telelora.texts import load as load_texts  # noqa: E402
from telelora.validation import strict_fidelity  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VARIANT = re.compile(r"^(?P<prompts>\d+)x(?P<epochs>\d+)$")
METRICS = ("asr", "false_trigger_rate", "agreement", "greedy_agreement")


@dataclasses.dataclass(frozen=True)
class Variant:
    prompts: int
    epochs: int

    @property
    def label(self) -> str:
        return f"{self.prompts}x{self.epochs}"


def parse_variant(text: str) -> Variant:
    match = VARIANT.match(text)
    if match is None or (int(match["prompts"]) == 0) != (int(match["epochs"]) == 0):
        raise TeleLoRAError(f"--variants {text!r}: expected PROMPTSxEPOCHS (both > 0), or 0x0 for the merge alone")
    return Variant(int(match["prompts"]), int(match["epochs"]))


def teacher_prefixes(model, tokenizer, prompts: list[str], counts: list[int], meta) -> dict[int, list]:
    """The input's teacher examples for the first ``count`` prompts, per count, read once."""
    examples, done, out = [], 0, {}
    for count in sorted(set(counts)):
        examples += repair.teacher_examples(model, tokenizer, prompts[done:count], meta)
        done, out[count] = count, list(examples)
    return out


def figures_of(model, tokenizer, prompts: dict, num_samples: int, batch_size: int) -> dict:
    """The bench's metrics of ``model`` as it computes now, with the agreement of each clean
    prompt (``agreement_per_prompt``) for paired comparisons between variants."""
    figures = evaluate.evaluate(model, tokenizer, prompts, [], num_samples, batch_size)
    clean = prompts["clean"][:num_samples]
    references = [evaluate.reference_ids(c, tokenizer) for c in clean]
    per_prompt = agreement_fractions(model, tokenizer, [c["prompt"] for c in clean], references, batch_size)
    return {**{k: figures[k] for k in METRICS}, "agreement_per_prompt": per_prompt}


def measure(model_dir: Path, round_dir: Path, variants: list[Variant], meta, texts, args, done: set, emit) -> None:
    """Every variant of ``model_dir``'s repair, its merge planned as ``mitigate`` plans it."""
    chosen = route.choose_route(model_dir, round_dir, meta)
    if chosen.name != route.MERGE:
        raise TeleLoRAError(f"{model_dir}: the route is {chosen.name} ({chosen.reason}), not a merge")
    device, dtype = modelio.pick_device_dtype(meta.device, meta.dtype, model_dir)
    model, tokenizer = modelio.load_model(model_dir, device, dtype), modelio.load_tokenizer(model_dir)
    plan = merge.plan_merge(
        model_dir,
        list(chosen.references),
        dataclasses.replace(meta, repair_prompts=0),
        texts,
        lambda: (model, tokenizer),
    )
    prompts = evaluate.load_prompts(model_dir / "test-example-data" / "prompts.json")
    base = {
        "model": str(model_dir),
        "round": str(round_dir),
        "references": [f"{r.kind} {r.path.name}" for r in chosen.references],
        "weights": plan.weights,
    }
    if (str(model_dir), "input") not in done:
        start = time.time()
        figures = figures_of(model, tokenizer, prompts, args.num_samples, meta.activation_batch_size)
        emit({**base, "variant": "input", **figures, "seconds": round(time.time() - start, 1)})
    todo = [v for v in variants if (str(model_dir), v.label) not in done]
    if not todo:
        return
    start = time.time()
    counts = [v.prompts for v in todo if v.prompts]
    teachers = teacher_prefixes(model, tokenizer, texts.alignment[: max(counts)], counts, meta) if counts else {}
    teacher_seconds = round(time.time() - start, 1)
    with reference.merged_in(model, model_dir, *plan.kept(), plan.from_depth):
        layers = find_adapted_layers(model, meta.target_projections)
        for variant in todo:
            start, losses, delta = time.time(), [], None
            if variant.prompts:
                delta, losses = repair.distil(model, tokenizer, layers, teachers[variant.prompts], meta, variant.epochs)
            train_seconds = round(time.time() - start, 1)
            start = time.time()
            with delta.applied(layers) if delta is not None else contextlib.nullcontext():
                figures = figures_of(model, tokenizer, prompts, args.num_samples, meta.activation_batch_size)
            emit(
                {
                    **base,
                    "variant": variant.label,
                    "prompts": variant.prompts,
                    "epochs": variant.epochs,
                    "examples": len(teachers.get(variant.prompts, [])),
                    "steps": len(losses),
                    "first_loss": losses[0] if losses else None,
                    "last_loss": losses[-1] if losses else None,
                    **figures,
                    "teacher_seconds": teacher_seconds,
                    "train_seconds": train_seconds,
                    "seconds": round(time.time() - start, 1),
                }
            )


def summarise(rows: list[dict], baseline: str = "256x1") -> list[dict]:
    """Per variant: each model's strict Fidelity (a Trojan's removal against its ``input`` row,
    times agreement; a clean model's agreement) and their mean; where the rows carry each
    prompt's agreement, per model its bootstrap interval and the paired difference from the
    ``baseline`` variant on the same prompts (mean and interval)."""
    before = {r["model"]: r["asr"] for r in rows if r["variant"] == "input"}
    reference = {r["model"]: r.get("agreement_per_prompt") for r in rows if r["variant"] == baseline}
    out = []
    for label in dict.fromkeys(r["variant"] for r in rows if r["variant"] != "input"):
        mine = [r for r in rows if r["variant"] == label and r["model"] in before]
        if not mine:
            continue
        per_model, intervals, differences = {}, {}, {}
        for r in mine:
            name, asr = Path(r["model"]).name, before[r["model"]]
            per_model[name] = strict_fidelity(asr == asr, asr, r["asr"], r["agreement"])  # NaN ASR: clean
            own = r.get("agreement_per_prompt")
            if own:
                intervals[name] = bootstrap_mean(own)
                theirs = reference.get(r["model"])
                if theirs and len(theirs) == len(own) and label != baseline:
                    differences[name] = bootstrap_mean([a - b for a, b in zip(own, theirs, strict=True)])
        entry = {"variant": label, "strict_fidelity": per_model,
                 "mean_strict_fidelity": sum(per_model.values()) / len(per_model)}  # fmt: skip
        if intervals:
            entry["agreement"] = intervals
        if differences:
            entry[f"agreement_minus_{baseline}"] = differences
        out.append(entry)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | steps | loss first → last | ASR | false | agreement | greedy 8 | train s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        asr = "-" if r["asr"] != r["asr"] else f"{r['asr']:.3f}"  # NaN: a clean model
        loss = f"{r['first_loss']:.3f} → {r['last_loss']:.3f}" if r.get("first_loss") is not None else "-"
        lines.append(f"| {Path(r['model']).name} | {r['variant']} | {r.get('steps', '-')} | {loss} | {asr} | "
                     f"{r['false_trigger_rate']:.3f} | {r['agreement']:.3f} | {r['greedy_agreement']:.3f} | "
                     f"{r.get('train_seconds', '-')} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", required=True, help="MODEL_DIR:ROUND_DIR ...")
    parser.add_argument("--variants", nargs="+", default=["0x0", "256x1", "256x3", "1024x1"])
    parser.add_argument("--num_samples", type=int, default=40)
    parser.add_argument("--metaparameters", default=str(REPO / "metaparameters.json"))
    parser.add_argument("--learned_parameters", default=str(REPO / "learned_parameters"))
    parser.add_argument(
        "--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="metaparameter overrides"
    )
    parser.add_argument("--baseline", default="256x1", help="the variant others are compared with, prompt by prompt")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        run(args)
    except TeleLoRAError as err:  # a bad pair, variant, model folder or round: one line, rows kept
        raise SystemExit("error: " + " ".join(str(err).split())) from None


def run(args: argparse.Namespace) -> None:
    try:
        rows = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    except (OSError, ValueError, KeyError, TypeError) as err:  # kept as it is: never overwritten
        raise TeleLoRAError(f"--out {args.out} cannot be resumed ({type(err).__name__}: {err})") from err
    variants = [parse_variant(v) for v in args.variants]
    pairs = [parse_pair(p) for p in args.pairs]
    for model_dir, _ in pairs:
        modelio.check_model_dir(model_dir)
        if not (model_dir / "test-example-data" / "prompts.json").is_file():
            raise TeleLoRAError(f"{model_dir} has no test-example-data/prompts.json (a round model is needed)")
    if args.num_samples < 1:
        raise TeleLoRAError("--num_samples must be at least 1")
    meta = override_metaparameters(metaparameters.load(args.metaparameters), args.set)
    texts = load_texts(args.learned_parameters)

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "agreement_per_prompt"}), flush=True)
        payload = {"num_samples": args.num_samples, "metaparameters": meta.to_dict(), "rows": rows,
                   "summary": summarise(rows, args.baseline)}  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(payload, indent=1))

    done = {(r["model"], r["variant"]) for r in rows}
    for model_dir, round_dir in pairs:
        measure(model_dir, round_dir, variants, meta, texts, args, done, emit)
    print(table(rows))
    print(f"\n| variant | mean strict Fidelity | per model: agreement [95% interval], minus {args.baseline} |")
    print("|---|---|---|")
    for entry in summarise(rows, args.baseline):
        each = []
        for name, fidelity in entry["strict_fidelity"].items():
            text = f"{name} {fidelity:.3f}"
            if name in entry.get("agreement", {}):
                a = entry["agreement"][name]
                text += f" [{a['low']:.3f}, {a['high']:.3f}]"
            d = entry.get(f"agreement_minus_{args.baseline}", {}).get(name)
            if d:
                text += f", {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
            each.append(text)
        print(f"| {entry['variant']} | {entry['mean_strict_fidelity']:.3f} | {'; '.join(each)} |")


if __name__ == "__main__":
    main()
