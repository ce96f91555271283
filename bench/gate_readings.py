"""What the repair's gate reads: the merge route planned as ``mitigate`` plans it, per model.

The repair after a merge (``telelora.repair``) runs only where the merge's guard reading, the
merged model's agreement with the input's own greedy answers on the guard prompts at the
weights the checks kept, is at most ``repair_max_agreement``. This bench plans the merge of
each model toward the references its round gives (route choice, trigger check, drift guard:
``telelora.merge.plan_merge``), with the repair itself left out, and records the reading, the
weights kept and where the gate would send it. The choice of ``repair_max_agreement`` is made
on validation models' readings beside what the repair did to each
([benches](../docs/benches.md#the-repairs-gate-benchgate_readingspy-session-21)).

    python bench/gate_readings.py --pairs ~/ffv/models/id-00000018:~/ffref ~/lv/models/id-00000000:~/lr \\
        --out bench/results/gate_readings_validation.json

Each pair is MODEL_DIR:ROUND_DIR (the training round handed to ``mitigate``). Resumable
(``--out`` keeps the pairs already read). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from telelora import merge, metaparameters, modelio, reference, route  # noqa: E402
from telelora.errors import TeleLoRAError  # noqa: E402
from telelora.io_utils import atomic_write_text  # noqa: E402
from telelora.texts import load as load_texts  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def parse_pair(text: str) -> tuple[Path, Path]:
    """``MODEL_DIR:ROUND_DIR`` as two folders; one clear error otherwise."""
    model, sep, round_dir = text.partition(":")
    if not sep or not model or not round_dir:
        raise TeleLoRAError(f"--pairs {text!r}: expected MODEL_DIR:ROUND_DIR")
    return Path(model).expanduser(), Path(round_dir).expanduser()


def read_gate(model_dir: Path, round_dir: Path, meta: metaparameters.Metaparameters, texts) -> dict:
    """The merge's plan for ``model_dir`` given ``round_dir``, without the repair, as one row."""
    start = time.time()
    modelio.check_model_dir(model_dir)
    chosen = route.choose_route(model_dir, round_dir, meta)
    row = {"model": str(model_dir), "round": str(round_dir), "route": chosen.name, "reason": chosen.reason}
    if chosen.name != route.MERGE:
        return {**row, "reading": None, "repair": False, "seconds": round(time.time() - start, 1)}
    device, dtype = modelio.pick_device_dtype(meta.device, meta.dtype, model_dir)

    def load():
        return modelio.load_model(model_dir, device, dtype), modelio.load_tokenizer(model_dir)

    plan = merge.plan_merge(
        model_dir, list(chosen.references), dataclasses.replace(meta, repair_prompts=0), texts, load
    )
    reading = None
    if plan.merges:  # the guard's figure where it ran, else the model is loaded and the merge measured alike
        model, tokenizer = (None, None) if plan.drift_guard.applied else load()

        def merged():
            return reference.merged_in(model, model_dir, *plan.kept(), plan.from_depth)

        reading = merge.gate_reading(model, tokenizer, merged, texts, meta, plan.drift_guard)
    return {
        **row,
        "references": [f"{r.kind} {r.path.name}" for r in chosen.references],
        "weights": plan.weights,
        "guard": dataclasses.asdict(plan.drift_guard),
        "trigger_checks": [dataclasses.asdict(c) for c in plan.trigger_checks],
        "reading": reading,
        "repair": reading is not None and merge.repairs(reading, meta),
        "seconds": round(time.time() - start, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", required=True, help="MODEL_DIR:ROUND_DIR ...")
    parser.add_argument("--metaparameters", default=str(REPO / "metaparameters.json"))
    parser.add_argument("--learned_parameters", default=str(REPO / "learned_parameters"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        run(args)
    except TeleLoRAError as err:  # a bad pair, model folder, round or metaparameters: one line, what was read is kept
        raise SystemExit(f"error: {err}") from None


def run(args: argparse.Namespace) -> None:
    pairs = [parse_pair(p) for p in args.pairs]
    meta = metaparameters.load(args.metaparameters)
    texts = load_texts(args.learned_parameters)
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {(r["model"], r["round"]) for r in rows}
    for model_dir, round_dir in pairs:
        if (str(model_dir), str(round_dir)) in done:
            continue
        rows.append(read_gate(model_dir, round_dir, meta, texts))
        payload = {"repair_max_agreement": meta.repair_max_agreement, "metaparameters": meta.to_dict(), "rows": rows}
        atomic_write_text(out, json.dumps(payload, indent=1))
    print(f"{'model':44} {'route':16} {'w kept':>12} {'reading':>8} repair")
    for r in rows:
        weights = "+".join(f"{w:.3f}" for w in r.get("weights", [])) or "-"
        reading = "-" if r["reading"] is None else f"{r['reading']:.3f}"
        print(f"{r['model'][-44:]:44} {r['route']:16} {weights:>12} {reading:>8} {'yes' if r['repair'] else 'no'}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
