"""How much of a farm Trojan's own weight change must go for the Trojan to go?

Each farm Trojan is its base plus a low-rank change ``dW``. This bench evaluates
``W_base + c dW`` for a few shrink factors ``c`` (``c = 1``: the Trojan; ``c = 0``: the base),
which is what merging the Trojan with its base at weight ``1 - c`` gives. It is an upper
bound for any method that can see ``dW`` (a reference model of the same base), not a
mitigation: ``mitigate`` never sees ``dW``.

    OMP_NUM_THREADS=1 python bench/delta_shrink.py --farm ~/farm-v1 --round ~/farm-v1-val \\
        --models id-00000000 id-00000046 --out bench/results/delta_shrink_cpu.json

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
def shrunk(model_dir: Path, factors: dict, c: float) -> torch.nn.Module:
    """The merged Trojan of ``model_dir`` with its change ``B A`` scaled by ``c``."""
    model = modelio.load_model(model_dir, torch.device("cpu"), torch.float32)
    params = dict(model.named_parameters())
    for name, (a, b) in factors.items():
        params[name] -= (1 - c) * (b.float() @ a.float())
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--farm", type=Path, required=True, help="a farm build folder (farm build OUT)")
    parser.add_argument("--round", type=Path, required=True, help="the split's materialised round folder")
    parser.add_argument("--models", nargs="+", required=True, help="Trojans of the train/validation split")
    parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--num_samples", type=int, default=24, help="clean and triggered prompts per model")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if any(not 0 <= c <= 1 for c in args.factors) or args.num_samples < 1 or args.batch_size < 1:
        raise SystemExit("error: --factors must lie in [0, 1]; --num_samples and --batch_size must be at least 1")
    try:
        spec = farm.load_spec(args.farm / "farm_spec.json")
        planned = {m.model_id: m for m in farm.plan(spec)}
        rows = []
        for model_id in args.models:
            record = farm.finished_record(args.farm / "models" / model_id)
            if model_id not in planned or not planned[model_id].poisoned or record is None or not record["passed"]:
                raise TeleLoRAError(f"--models {model_id}: not a built Trojan of {args.farm}")
            if planned[model_id].split == "test":
                raise TeleLoRAError(f"--models {model_id} is a test-split model: only train/validation are looked at")
            folder = args.round / "models" / model_id
            modelio.check_model_dir(folder)
            tokenizer = modelio.load_tokenizer(folder)
            prompts = evaluate.load_prompts(folder / "test-example-data" / "prompts.json")
            factors = farm.load_delta(args.farm / "models" / model_id / farm.DELTA_FILE)
            for c in args.factors:
                model = shrunk(folder, factors, c)
                figures = evaluate.evaluate(model, tokenizer, prompts, [], args.num_samples, args.batch_size)
                rows.append({"model": model_id, "behaviour": planned[model_id].behaviour, "c": c, **figures})
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
