"""Where a farm model's weight change lives, against what the weights and clean traffic show.

A data-free mitigation sees the changed weights ``W = W_base + dW`` and the layer inputs on
clean texts, never ``dW``. This bench asks whether ``dW`` hides in a subspace those two can
point at. Per layer a farm model changed, the share of ``||dW||_F^2`` captured by the top-k
directions of each candidate (``||dW Q Q^T||^2 / ||dW||^2``, input side unless named
``out``):

* ``gain_quiet``: generalised eigenvectors of ``(W^T W, Sigma + eps I)``: high gain, little
  clean traffic (``Sigma``: the clean inputs' second moment);
* ``w_svd``: right singular vectors of ``W``; ``quiet`` / ``loud``: least / most clean traffic;
* ``out_svd``, ``out_loud``: left singular vectors of ``W``, most output traffic ``W Sigma W^T``;
* ``random``: k / width, what a random subspace captures on average.

And ``spike``: ``dW``'s largest singular value over the median singular value of ``W``. A
low-rank change whose singular values sit inside the bulk of ``W``'s spectrum leaves no
outlier in it, so nothing in ``W`` alone marks it; ``spike_top`` is the same over ``W``'s
largest singular value.

And ``traffic``: the clean traffic ``dW`` reads against that of ``W`` and of an average
direction (``tr(M Sigma M^T) / ||M||_F^2 / (tr Sigma / width)``; 1 is average, above 1 is
louder). Medians over layers per model, then over models.

    python bench/delta_subspace.py --farm ~/farm-v1 --models id-00000008 id-00000012 \\
        --out bench/results/delta_subspace_cpu.json

Only train/validation models are for looking at (the test split is never used for choices).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from telelora import modelio  # noqa: E402
from telelora.chat import pad_id, padded, prompt_ids  # noqa: E402
from telelora.errors import TeleLoRAError  # noqa: E402
from telelora.io_utils import atomic_write_text  # noqa: E402
from telelora.lab import farm  # noqa: E402
from telelora.lab.round_builder import base_folder  # noqa: E402
from telelora.metaparameters import REPO_ROOT  # noqa: E402
from telelora.texts import load as load_texts  # noqa: E402

CANDIDATES = ("gain_quiet", "w_svd", "quiet", "loud", "out_svd", "out_loud", "random")
EPS = 1e-2  # ridge on Sigma, relative to its mean eigenvalue


def share(delta: torch.Tensor, basis: torch.Tensor, side: str = "in") -> float:
    """Share of ``||delta||_F^2`` inside the span of ``basis``'s orthonormal columns."""
    projected = delta @ basis if side == "in" else basis.T @ delta
    return float(projected.norm() ** 2 / delta.norm() ** 2)


def traffic(matrix: torch.Tensor, sigma: torch.Tensor) -> float:
    """Clean traffic through ``matrix``'s input directions, 1 for an average direction."""
    mean = torch.trace(sigma) / sigma.shape[0]
    return float(torch.trace(matrix @ sigma @ matrix.T) / matrix.norm() ** 2 / mean)


def layer_shares(weight: torch.Tensor, delta: torch.Tensor, sigma: torch.Tensor, ks: list[int]) -> dict:
    """Every candidate's share of ``delta`` for each k, and the traffic ratios (float64)."""
    weight, delta, sigma = weight.double(), delta.double(), sigma.double()
    width = sigma.shape[0]
    _, quiet_first = torch.linalg.eigh(sigma)
    left, singular, right_t = torch.linalg.svd(weight, full_matrices=False)
    delta_top = torch.linalg.svdvals(delta)[0]
    _, out_quiet_first = torch.linalg.eigh(weight @ sigma @ weight.T)
    ridge = EPS * torch.trace(sigma) / width * torch.eye(width, dtype=sigma.dtype)
    whitening = torch.linalg.inv(torch.linalg.cholesky(sigma + ridge))
    _, vectors = torch.linalg.eigh(whitening @ weight.T @ weight @ whitening.T)
    gain_quiet = whitening.T @ vectors  # generalised eigenvectors, smallest ratio first
    row = {
        "width": width,
        "traffic_delta": traffic(delta, sigma),
        "traffic_weight": traffic(weight, sigma),
        "spike": float(delta_top / singular.median()),
        "spike_top": float(delta_top / singular[0]),
    }
    for k in ks:
        row[f"gain_quiet{k}"] = share(delta, torch.linalg.qr(gain_quiet[:, -k:])[0])
        row[f"w_svd{k}"] = share(delta, right_t[:k].T)
        row[f"quiet{k}"] = share(delta, quiet_first[:, :k])
        row[f"loud{k}"] = share(delta, quiet_first[:, -k:])
        row[f"out_svd{k}"] = share(delta, left[:, :k], "out")
        row[f"out_loud{k}"] = share(delta, out_quiet_first[:, -k:], "out")
        row[f"random{k}"] = k / width
    return row


@torch.no_grad()
def input_moments(model, tokenizer, names: list[str], texts: list[str], batch_size: int = 8) -> dict:
    """``Sigma = E[x x^T]`` of each named linear layer's input over every clean text token."""
    modules = dict(model.named_modules())
    sums = {n: torch.zeros(modules[n].in_features, modules[n].in_features, dtype=torch.float64) for n in names}
    state = {"mask": None, "tokens": 0}

    def hook(name):
        def accumulate(module, args):
            x = args[0][state["mask"].bool()].double()
            sums[name].add_(x.T @ x)

        return accumulate

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        sequences = [prompt_ids(tokenizer, t) for t in texts]
        for start in range(0, len(sequences), batch_size):
            ids, mask = padded(sequences[start : start + batch_size], pad_id(tokenizer), torch.device("cpu"))
            state["mask"] = mask
            model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
            state["tokens"] += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    return {n: s / state["tokens"] for n, s in sums.items()}


def measure(base_dir: Path, factors: dict, texts: list[str], ks: list[int]) -> list[dict]:
    """One row per changed layer of the model ``base + B A`` (``factors``: farm deltas)."""
    model = modelio.load_model(base_dir, torch.device("cpu"), torch.float32)
    tokenizer = modelio.load_tokenizer(base_dir)
    params = dict(model.named_parameters())
    deltas = {}
    for name, (a, b) in factors.items():
        deltas[name] = b.float() @ a.float()
        params[name].data += deltas[name]
    sigmas = input_moments(model, tokenizer, [n.removesuffix(".weight") for n in deltas], texts)
    return [
        {"layer": name, **layer_shares(params[name].data, delta, sigmas[name.removesuffix(".weight")], ks)}
        for name, delta in deltas.items()
    ]


def summary(per_model: dict[str, list[dict]]) -> dict[str, dict]:
    """Per quantity, the median over layers of each model, and of those the median and range."""
    keys = [k for k in next(iter(per_model.values()))[0] if k not in ("layer", "width")]
    table = {}
    for key in keys:
        medians = [statistics.median(r[key] for r in rows) for rows in per_model.values()]
        table[key] = {"median": statistics.median(medians), "min": min(medians), "max": max(medians)}
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--farm", type=Path, required=True, help="a farm build folder (farm build OUT)")
    parser.add_argument("--models", nargs="+", required=True, help="built model ids of the train/validation split")
    parser.add_argument("--texts", type=int, default=48, help="clean reference texts for Sigma")
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--cache_dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.texts < 1 or any(k < 1 for k in args.ks):
        raise SystemExit("error: --texts and every --ks value must be at least 1")
    try:
        spec = farm.load_spec(args.farm / "farm_spec.json")
        planned = {m.model_id: m for m in farm.plan(spec)}
        texts = load_texts(REPO_ROOT / "learned_parameters").reference[: args.texts]
        per_model = {}
        for model_id in args.models:
            record = farm.finished_record(args.farm / "models" / model_id)
            if model_id not in planned or record is None or not record["passed"]:
                raise TeleLoRAError(f"--models {model_id}: not a built model of {args.farm}")
            if planned[model_id].split == "test":
                raise TeleLoRAError(f"--models {model_id} is a test-split model: only train/validation are looked at")
            base_dir = base_folder(planned[model_id].base, args.farm / ".work", args.cache_dir)
            factors = farm.load_change(args.farm / "models" / model_id)
            per_model[model_id] = measure(base_dir, factors, texts, args.ks)
    except TeleLoRAError as err:
        raise SystemExit(f"error: {err}") from None
    table = summary(per_model)
    print(f"{len(per_model)} model(s); medians over layers, then over models [min, max]")
    for key, stats in table.items():
        print(f"  {key:<16} {stats['median']:.3f}  [{stats['min']:.3f}, {stats['max']:.3f}]")
    if args.out:
        payload = {"settings": {k: str(v) for k, v in vars(args).items()}, "summary": table, "layers": per_model}
        atomic_write_text(args.out, json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
