"""How much of a farm Trojan's own weight change must go for the Trojan to go?

Each farm Trojan is its base plus a low-rank change ``dW``. This bench evaluates
``W_base + c dW`` for a few shrink factors ``c`` (``c = 1``: the Trojan; ``c = 0``: the base),
which is what merging the Trojan with its base at weight ``1 - c`` gives. It is an upper
bound for any method that can see ``dW`` (a reference model of the same base), not a
mitigation: ``mitigate`` never sees ``dW``.

``--references`` asks the realistic question: the reference is not the base but another
fine-tune of it, a farm clean fine-tune (as the clean models of NIST's
``--round_training_dataset_dirpath`` would be). Merging with it at weight ``1 - c`` gives
``c W + (1 - c) W_ref = W_base + c dW + (1 - c) dW_ref``: the Trojan shrinks as before, and
part of an unrelated benign change comes in.

    OMP_NUM_THREADS=1 python bench/delta_shrink.py --farm ~/farm-v1 --round ~/farm-v1-val \\
        --models id-00000000 id-00000046 --out bench/results/delta_shrink_cpu.json \\
        [--references id-00000041 id-00000060]

Only train/validation models are for looking at (a test-split model is refused).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from telelora import modelio  # noqa: E402
from telelora.errors import TeleLoRAError  # noqa: E402
from telelora.io_utils import atomic_write_text  # noqa: E402
from telelora.lab import evaluate, farm  # noqa: E402


@torch.no_grad()
def shrunk(model_dir: Path, factors: dict, c: float, reference: dict | None = None) -> torch.nn.Module:
    """The merged Trojan of ``model_dir`` with its change ``B A`` scaled by ``c``; with the
    factors of a ``reference`` fine-tune of the same base, merged with that at weight ``1 - c``."""
    model = modelio.load_model(model_dir, torch.device("cpu"), torch.float32)
    params = dict(model.named_parameters())
    for sign, change in ((-1.0, factors), (1.0, reference or {})):
        for name, (a, b) in change.items():
            params[name] += sign * (1 - c) * (b.float() @ a.float())
    return model


def _built(farm_dir: Path, planned: dict, model_id: str, kind: str, flag: str):
    """The farm model ``model_id`` of ``kind``, built and not of the test split."""
    record = farm.finished_record(farm_dir / "models" / model_id)
    if model_id not in planned or planned[model_id].kind != kind or record is None or not record["passed"]:
        label = {"trojan": "Trojan", "clean_finetune": "clean fine-tune"}[kind]
        raise TeleLoRAError(f"{flag} {model_id}: not a built {label} of {farm_dir}")
    if planned[model_id].split == "test":
        raise TeleLoRAError(f"{flag} {model_id} is a test-split model: only train/validation are looked at")
    return planned[model_id]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--farm", type=Path, required=True, help="a farm build folder (farm build OUT)")
    parser.add_argument("--round", type=Path, required=True, help="the split's materialised round folder")
    parser.add_argument("--models", nargs="+", required=True, help="Trojans of the train/validation split")
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument(
        "--references", nargs="+", default=[], help="clean fine-tunes (train/validation) to merge with, one per base"
    )
    parser.add_argument("--num_samples", type=int, default=24, help="clean and triggered prompts per model")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if any(not 0 <= c <= 1 for c in args.factors) or args.num_samples < 1 or args.batch_size < 1:
        raise SystemExit("error: --factors must lie in [0, 1]; --num_samples and --batch_size must be at least 1")
    try:
        spec = farm.load_spec(args.farm / "farm_spec.json")
        planned = {m.model_id: m for m in farm.plan(spec)}
        references = {}
        for model_id in args.references:
            base = _built(args.farm, planned, model_id, "clean_finetune", "--references").base
            if base in references:
                raise TeleLoRAError(f"--references: {references[base][0]} and {model_id} are both of base {base}")
            references[base] = model_id, farm.load_change(args.farm / "models" / model_id)
        rows = []
        for model_id in args.models:
            base = _built(args.farm, planned, model_id, "trojan", "--models").base
            if args.references and base not in references:
                raise TeleLoRAError(f"--references: none is of base {base}, the base of {model_id}")
            reference_id, reference = references.get(base, (None, None))
            folder = args.round / "models" / model_id
            modelio.check_model_dir(folder)
            tokenizer = modelio.load_tokenizer(folder)
            prompts = evaluate.load_prompts(folder / "test-example-data" / "prompts.json")
            factors = farm.load_change(args.farm / "models" / model_id)
            for c in args.factors:
                model = shrunk(folder, factors, c, reference)
                figures = evaluate.evaluate(model, tokenizer, prompts, [], args.num_samples, args.batch_size)
                rows.append(
                    {"model": model_id, "behaviour": planned[model_id].behaviour, "reference": reference_id, "c": c,
                     **figures}
                )  # fmt: skip
                print(f"{model_id} c={c:g}: ASR {figures['asr']:.3f}, agreement {figures['agreement']:.3f}", flush=True)
    except TeleLoRAError as err:
        raise SystemExit(f"error: {err}") from None
    print("| model | " + " | ".join(f"c = {c:g}: ASR / agreement" for c in args.factors) + " |")
    print("|---|" + "---|" * len(args.factors))
    for model_id in args.models:
        cells = [f"{r['asr']:.2f} / {r['agreement']:.3f}" for r in rows if r["model"] == model_id]
        print(f"| {model_id} | " + " | ".join(cells) + " |")
    if args.out:
        payload = {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        atomic_write_text(args.out, json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
