"""One table from several finished quality-bench runs: the summaries with intervals, a paired
difference between two methods, JSON and PNG.

A run of ``bench/mitigation_quality.py`` measures some methods on some models; a table across
runs (the shipped route measured in one session, the slow baselines in another) takes from
each file the methods asked for, ``FILE:METHOD,METHOD`` (every method when none is named).
``--merge`` in the quality bench refuses runs whose metaparameters differ, which is right for
resuming a run but not for joining a baseline (whose rows do not depend on the
metaparameters) with the shipped route. What this join does hold to: one (model, method)
once, the same model built alike in every file (its fingerprint), and one prompt count.

``--paired A B``: on the models where both methods ran, the mean of ``A - B`` in strict
Fidelity with its bootstrap interval over models: the comparison the issue's "intervals
apart" asks for, without the spread between models that separate means carry.

    python bench/join_results.py --runs bench/results/full_test_route_guard0.7_id-00000022.json \
        bench/results/full_test_baselines_id-00000022.json:crow,telelora --paired mitigate crow \
        --out bench/results/joined.json --markdown
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.mitigation_quality import (  # noqa: E402
    BREAKDOWNS,
    RESAMPLES,
    bootstrap_mean,
    format_summary,
    label,
    plot,
    summarise,
)
from telelora.errors import TeleLoRAError  # noqa: E402
from telelora.io_utils import atomic_write_text  # noqa: E402


def parse_run(text: str) -> tuple[Path, set[str] | None]:
    """``FILE`` or ``FILE:METHOD,METHOD`` -> the file and the methods to take (None: all)."""
    path, _, methods = text.partition(":")
    chosen = {m for m in methods.split(",") if m} if methods else None
    if methods and not chosen:
        raise TeleLoRAError(f"--runs {text!r}: expected FILE or FILE:METHOD[,METHOD...]")
    return Path(path), chosen


def load_rows(runs: list[tuple[Path, set[str] | None]]) -> list[dict]:
    """Every chosen row of every run, with its ``source``; one clear error for a file that cannot
    be read, a method a file does not hold, a (model, method) given twice, a model whose
    fingerprint differs between files, or runs with different prompt counts."""
    rows, seen, fingerprints, samples = [], {}, {}, {}
    for path, methods in runs:
        try:
            payload = json.loads(path.read_text())
            found = payload["rows"]
            settings = payload.get("settings", {})
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise TeleLoRAError(f"--runs: cannot read quality-bench rows from {path}: {error}") from error
        missing = sorted((methods or set()) - {r["method"] for r in found})
        if missing:
            raise TeleLoRAError(f"--runs: {path} holds no rows of {', '.join(missing)}")
        samples[path] = settings.get("num_samples")
        for row in found:
            if methods is not None and row["method"] not in methods:
                continue
            key = (row["model"], row["method"], row.get("steps"))
            if key in seen:
                raise TeleLoRAError(f"--runs: {row['model']} {row['method']} is in both {seen[key]} and {path}")
            seen[key] = path
            known = fingerprints.setdefault(row["model"], (row.get("fingerprint"), path))
            if known[0] != row.get("fingerprint"):
                raise TeleLoRAError(f"--runs: {row['model']} differs between {known[1]} and {path} (another build)")
            rows.append({**row, "source": path.name})
    if len(set(samples.values())) > 1:
        raise TeleLoRAError(f"--runs: the runs measured different prompt counts: {samples}")
    return rows


def paired_difference(rows: list[dict], first: str, second: str, resamples: int = RESAMPLES) -> dict:
    """``first - second`` in strict Fidelity per model both measured, and its mean's interval.
    Methods are named as the summary names them (``telelora K=1``: one per K)."""
    strict = {(r["model"], label(r)): r["strict_fidelity"] for r in rows}
    models = sorted(m for m, method in strict if method == first and (m, second) in strict)
    if not models:
        raise TeleLoRAError(f"--paired: no model has rows of both {first} and {second}")
    differences = [strict[m, first] - strict[m, second] for m in models]
    return {"first": first, "second": second, "models": models, "differences": differences,
            **bootstrap_mean(differences, resamples)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="FILE or FILE:METHOD,METHOD (quality-bench JSON)")
    parser.add_argument("--paired", nargs=2, metavar=("A", "B"), help="also A - B on the models both measured")
    parser.add_argument("--out", type=Path, required=True, help="joined JSON; the plot goes next to it as .png")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    try:
        rows = load_rows([parse_run(text) for text in args.runs])
        summaries: dict = {by: summarise(rows, by) for by in BREAKDOWNS}
        if args.paired:
            summaries["paired"] = paired_difference(rows, *args.paired)
    except TeleLoRAError as error:
        raise SystemExit(f"error: {error}") from None
    try:
        atomic_write_text(args.out, json.dumps({"runs": args.runs, "rows": rows, "summaries": summaries}, indent=2))
        plot(summaries["all"], rows, args.out.with_suffix(".png"))
    except OSError as error:  # a write is atomic: what --out held before is kept
        raise SystemExit(f"error: cannot write {args.out} or its plot: {error}") from None
    for by, title in BREAKDOWNS.items():
        print(f"\n{title}:\n{format_summary(summaries[by], markdown=args.markdown)}")
    if args.paired:
        p = summaries["paired"]
        print(f"\n{p['first']} - {p['second']}, strict Fidelity, {p['n']} models: {p['mean']:+.3f} "
              f"[{p['low']:+.3f}, {p['high']:+.3f}]  per model {np.round(p['differences'], 3).tolist()}")  # fmt: skip
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
