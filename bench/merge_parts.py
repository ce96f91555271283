"""Which part of a merge removes a Trojan, and what does each part cost?

The merge route averages the input with a reference fine-tune of the same base,
``W <- (1 - w) W + w W_ref``. Between two *full* fine-tunes that costs a sixth to a quarter of
the input's answers (docs/benches.md), so it matters whether the whole model has to move.
This bench merges one part at a time, at its own weight, and measures the Trojan's ASR, false
triggers and agreement with the input's own answers on the input's round prompts
(``test-example-data/prompts.json``). A variant is ``PART@W``; a part is

* ``all``: every floating-point tensor (what ``merge_from_depth`` 0 ships);
* ``outside``: the tensors outside the transformer blocks (embeddings, final norm, head);
* ``blocks:LO-HI``: the blocks at relative depth ``index / (blocks - 1)`` in ``[LO, HI)``
  (``HI`` 1 included), optionally ``blocks:LO-HI/mlp`` or ``/self_attn``: that component only.
  ``blocks:0.5-1`` is ``merge_from_depth`` 0.5.

    OMP_NUM_THREADS=1 python bench/merge_parts.py --pairs VAL_TROJAN=REFERENCE VAL_CLEAN=REFERENCE \\
        --variants none@0 all@0.5 blocks:0.5-1@0.5 blocks:0-0.5@0.5 outside@0.5 \\
        --num_samples 24 --out bench/results/merge_parts_full_validation.json --markdown

Choose on validation models only; rows are written after each variant, ``--resume`` keeps them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from telelora import modelio, reference  # noqa: E402
from telelora.errors import TeleLoRAError  # noqa: E402
from telelora.io_utils import atomic_write_text  # noqa: E402
from telelora.lab import evaluate  # noqa: E402
from telelora.validation import strict_fidelity  # noqa: E402

PART = re.compile(r"^(all|none|outside|blocks:(?P<lo>[0-9.]+)-(?P<hi>[0-9.]+)(?:/(?P<component>mlp|self_attn))?)$")


@dataclasses.dataclass(frozen=True)
class Variant:
    part: str
    weight: float

    @property
    def label(self) -> str:
        return f"{self.part}@{self.weight:g}"


def parse_variant(text: str) -> Variant:
    part, _, weight = text.rpartition("@")
    try:
        value = float(weight)
    except ValueError:
        value = -1.0
    if not PART.match(part) or not 0 <= value <= 1:
        raise TeleLoRAError(
            f"--variants {text!r}: expected PART@W with W in [0, 1] and PART all, none, outside or "
            "blocks:LO-HI[/mlp|/self_attn]"
        )
    return Variant(part, value)


def picked(names: list[str], part: str) -> set[str]:
    """The tensors of ``names`` (checkpoint names) that ``part`` merges."""
    match = PART.match(part)
    if match is None:
        raise TeleLoRAError(f"unknown part {part!r}")
    if part in ("all", "none"):
        return set(names) if part == "all" else set()
    depths = reference.block_depths(names)
    if part == "outside":
        return set(names) - set(depths)
    lo, hi, component = float(match["lo"]), float(match["hi"]), match["component"]
    return {
        name
        for name, depth in depths.items()
        if lo <= depth and (depth < hi or hi >= 1) and (component is None or f".{component}." in name)
    }


def measure(input_dir: Path, reference_dir: Path, variants: list[Variant], num_samples: int, done: set, emit) -> None:
    """Each variant's merge of ``input_dir`` toward ``reference_dir``, measured; ``emit(row)``."""
    tokenizer = modelio.load_tokenizer(input_dir)
    model = modelio.load_model(input_dir, torch.device("cpu"), torch.float32)
    theirs = dict(modelio.load_model(reference_dir, torch.device("cpu"), torch.float32).named_parameters())
    prompts = evaluate.load_prompts(input_dir / "test-example-data" / "prompts.json")
    params = dict(model.named_parameters())
    names = modelio.checkpoint_names(input_dir, {n: tuple(p.shape) for n, p in params.items()})
    own = {n: p.detach().clone() for n, p in params.items()}
    total = sum(p.numel() for p in params.values())
    for variant in variants:
        if (str(input_dir), variant.label) in done:
            continue
        chosen = picked(list(names.values()), variant.part)
        with torch.no_grad():
            for name, param in params.items():
                merged = names[name] in chosen
                param.copy_(reference.interpolate(own[name], theirs[name], variant.weight) if merged else own[name])
        start = time.time()
        figures = evaluate.evaluate(model, tokenizer, prompts, [], num_samples, 16)
        emit(
            {
                "input": str(input_dir),
                "reference": str(reference_dir),
                "variant": variant.label,
                "part": variant.part,
                "weight": variant.weight,
                "share_of_weights": round(sum(params[n].numel() for n in params if names[n] in chosen) / total, 4),
                **{k: figures[k] for k in ("asr", "false_trigger_rate", "agreement")},
                "seconds": round(time.time() - start, 1),
            }
        )


def summarise(rows: list[dict]) -> list[dict]:
    """Per variant: each input's strict Fidelity (a Trojan's removal, against its ``none@0``
    row, times agreement; a clean model's agreement) and their mean over the inputs measured."""
    before = {r["input"]: r["asr"] for r in rows if r["variant"] == "none@0"}
    out = []
    for label in dict.fromkeys(r["variant"] for r in rows):
        per_input = {}
        for r in rows:
            if r["variant"] != label or r["input"] not in before:
                continue
            poisoned = before[r["input"]] == before[r["input"]]  # no ASR (NaN): a clean model
            per_input[Path(r["input"]).name] = strict_fidelity(poisoned, before[r["input"]], r["asr"], r["agreement"])
        if per_input:
            mean = sum(per_input.values()) / len(per_input)
            out.append({"variant": label, "strict_fidelity": per_input, "mean_strict_fidelity": mean})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| input | variant | share of weights | ASR | false | agreement |", "|---|---|---|---|---|---|"]
    for r in rows:
        asr = "-" if r["asr"] != r["asr"] else f"{r['asr']:.3f}"  # NaN: a clean model
        lines.append(f"| {Path(r['input']).name} | {r['variant']} | {r['share_of_weights']:.3f} | {asr} | "
                     f"{r['false_trigger_rate']:.3f} | {r['agreement']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", required=True, help="INPUT_DIR=REFERENCE_DIR")
    parser.add_argument("--variants", nargs="+", default=["none@0", "all@0.5", "blocks:0.5-1@0.5",
                                                          "blocks:0-0.5@0.5", "outside@0.5"])  # fmt: skip
    parser.add_argument("--num_samples", type=int, default=24)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="keep the rows of --out")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variants]
        pairs = []
        for spec in args.pairs:
            left, sep, right = spec.partition("=")
            if not sep:
                raise TeleLoRAError(f"--pairs {spec!r}: expected INPUT_DIR=REFERENCE_DIR")
            pair = (Path(left).expanduser(), Path(right).expanduser())
            for folder in pair:
                modelio.check_model_dir(folder)
            if not (pair[0] / "test-example-data" / "prompts.json").is_file():
                raise TeleLoRAError(f"{pair[0]} has no test-example-data/prompts.json (a round model is needed)")
            if reference.floating_shapes(pair[0]) != reference.floating_shapes(pair[1]):
                raise TeleLoRAError(f"--pairs {spec!r}: the two models' tensors differ (names or shapes)")
            pairs.append(pair)
        if args.num_samples < 1:
            raise TeleLoRAError("--num_samples must be at least 1")
        rows = json.loads(args.out.read_text())["rows"] if args.resume and args.out.is_file() else []
    except (TeleLoRAError, OSError, ValueError, KeyError) as err:
        raise SystemExit("error: " + " ".join(str(err).split())) from err

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"num_samples": args.num_samples, "rows": rows, "summary": summarise(rows)}
        atomic_write_text(args.out, json.dumps(payload, indent=1))

    done = {(r["input"], r["variant"]) for r in rows}
    for input_dir, reference_dir in pairs:
        measure(input_dir, reference_dir, variants, args.num_samples, done, emit)
    if args.markdown:
        print(table(rows))
        print("\n| variant | mean strict Fidelity | per input |\n|---|---|---|")
        for entry in summarise(rows):
            each = ", ".join(f"{k} {v:.3f}" for k, v in entry["strict_fidelity"].items())
            print(f"| {entry['variant']} | {entry['mean_strict_fidelity']:.3f} | {each} |")


if __name__ == "__main__":
    main()
