"""Can a generator predict a Trojan's weight change from what ``mitigate`` sees? A layer-local test.

The farm knows every Trojan's change ``dW = B A`` of each layer. This bench gives the generators
the most direct supervision there is: per adapted layer, the adapter's change of the weights,
``G = s W V^T U`` (``W = W_base + dW``, the Trojan's weights), should cancel ``dW`` on the
layer's own token inputs. A model's residual is

    R = sum_l ||(G_l + dW_l) X_l^T||^2 / sum_l ||dW_l X_l^T||^2

over its adapted layers (a layer the Trojan left alone adds ``||G_l X_l^T||^2``), ``X_l``
the layer's inputs at every token of triggered prompts and of clean prompts, each followed
by the base's answer. ``R = 1`` is the identity adapter; ``R = 0`` gives back the base model,
the ideal mitigation. Also reported: ``R`` on the triggered and clean tokens alone.

Generators are trained on the train split's Trojans and measured on the validation split's
(the test split is never looked at). Variants, rows of one table:

* ``activations``: the shipped generator's input, the reference activations (N x H);
* ``weights``: plus a weight channel ``X W^T W`` (the reference inputs as the layer amplifies
  them: invariant to permuting output neurons, equivariant in input neurons);
* ``free``: per validation model, ``U, V`` fitted directly to its own ``dW`` (the floor a
  rank-r multiplicative adapter reaches when it knows the change).

Generalisation is the gap between a variant's train and validation ``R``: a generator that
learned where Trojans live lowers both.

    OMP_NUM_THREADS=1 python bench/layer_local.py --farm ~/farm-v1 --scratch ~/exp/layer_local \\
        --out bench/results/layer_local_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from telelora import activations, modelio  # noqa: E402
from telelora.architectures import find_adapted_layers  # noqa: E402
from telelora.chat import pad_id, padded, prompt_ids  # noqa: E402
from telelora.einnet import EinNet  # noqa: E402
from telelora.errors import TeleLoRAError  # noqa: E402
from telelora.generator import AdapterGenerator, rms_normalised  # noqa: E402
from telelora.io_utils import atomic_write_text  # noqa: E402
from telelora.lab import farm  # noqa: E402
from telelora.lab.curves import save_figure  # noqa: E402
from telelora.lab.round_builder import base_folder  # noqa: E402
from telelora.metaparameters import PROJECTION_TYPES, REPO_ROOT  # noqa: E402
from telelora.metaparameters import load as load_meta  # noqa: E402
from telelora.texts import load as load_texts  # noqa: E402

VARIANTS = ("activations", "weights")
DATA_VERSION = 2


@dataclasses.dataclass
class LayerData:
    """One adapted layer of one farm model: what the generator reads and what it must cancel."""

    name: str
    projection_type: str
    depth: float
    reference: torch.Tensor  # N x H, the generator's input
    weight_channel: torch.Tensor  # N x H, X W^T W
    rows: torch.Tensor  # T x H token inputs (float16), triggered rows first
    triggered: int  # how many rows are triggered
    factors: tuple[torch.Tensor, torch.Tensor] | None  # (A, B) of dW; None where the Trojan left the layer alone


@dataclasses.dataclass
class ModelData:
    model_id: str
    base: str
    split: str
    layers: list[LayerData]

    def save(self, path: Path) -> None:
        """Plain tensors and containers only, so ``torch.load(weights_only=True)`` reads them back."""
        torch.save({**vars(self), "layers": [vars(layer) for layer in self.layers]}, path)

    @classmethod
    def load(cls, path: Path) -> ModelData:
        stored = torch.load(path, weights_only=True, mmap=True)  # layers left out are never read
        return cls(**{**stored, "layers": [LayerData(**layer) for layer in stored["layers"]]})

    def in_blocks(self, count: int) -> ModelData:
        """The layers of ``count`` evenly spaced blocks, the first and the last among them."""
        depths = sorted({layer.depth for layer in self.layers})
        picked = {depths[round(i * (len(depths) - 1) / max(count - 1, 1))] for i in range(min(count, len(depths)))}
        return dataclasses.replace(self, layers=[layer for layer in self.layers if layer.depth in picked])


@torch.no_grad()
def token_rows(model, tokenizer, modules: dict, sequences: list[list[int]], count: int, seed: int) -> dict:
    """``count`` token inputs of every named linear layer, the same seeded positions for all."""
    ids, mask = padded(sequences, pad_id(tokenizer), torch.device("cpu"))
    positions = mask.flatten().nonzero().squeeze(1)
    chosen = positions[torch.randperm(len(positions), generator=torch.Generator().manual_seed(seed))[:count]]
    rows = {}

    def hook(name):
        def keep(module, args):
            rows[name] = args[0].flatten(0, 1)[chosen].to(torch.float16)

        return keep

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return rows


def prepare(model_spec, record, spec, farm_dir: Path, meta, reference_texts, rows: int, cache_dir) -> ModelData:
    """Load the base, add the Trojan's change, and read every adapted layer's data."""
    base_dir = base_folder(model_spec.base, farm_dir / ".work", cache_dir)
    model = modelio.load_model(base_dir, torch.device("cpu"), torch.float32)
    tokenizer = modelio.load_tokenizer(base_dir)
    params = dict(model.named_parameters())
    factors = farm.load_change(farm_dir / "models" / model_spec.model_id)
    for name, (a, b) in factors.items():
        params[name].data += b.float() @ a.float()
    layers = find_adapted_layers(model, meta.target_projections)
    reference = activations.collect(
        model, tokenizer, layers, reference_texts, meta.activation_tokens, meta.activation_batch_size,
        meta.max_tokens, meta.seed,
    )  # fmt: skip
    answers = json.loads((farm_dir / ".work" / f"answers-{model_spec.base}.json").read_text())["answers"]
    prompts = farm.prompt_sets(spec)
    triggered = [
        prompt_ids(tokenizer, p) + a
        for p, a in zip(record["check"]["triggered_prompts"], answers["check_triggered"], strict=True)
    ]
    clean = [prompt_ids(tokenizer, p) + a for p, a in zip(prompts["check_clean"], answers["check_clean"], strict=True)]
    modules = {layer.name: layer.module for layer in layers}
    seed = int(model_spec.model_id.split("-")[-1])
    on_triggered = token_rows(model, tokenizer, modules, triggered, rows, seed)
    on_clean = token_rows(model, tokenizer, modules, clean, rows, seed + 1)
    out = []
    for layer in layers:
        x = reference[layer.name]
        w = layer.module.weight.detach()
        out.append(
            LayerData(
                layer.name,
                layer.projection_type,
                layer.depth,
                x,
                (x @ w.T) @ w,
                torch.cat((on_triggered[layer.name], on_clean[layer.name])),
                len(on_triggered[layer.name]),
                tuple(t.float() for t in factors[f"{layer.name}.weight"])
                if f"{layer.name}.weight" in factors
                else None,
            )
        )
    return ModelData(model_spec.model_id, model_spec.base, model_spec.split, out)


def base_weights(base_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    model = modelio.load_model(base_dir, torch.device("cpu"), torch.float32)
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach().clone() for n in names}


class WeightAwareGenerator(AdapterGenerator):
    """The shipped generator with one more input channel, the weight channel ``X W^T W``."""

    def __init__(self, hidden: int, stacks: int, use_depth_channel: bool):
        super().__init__(hidden, stacks, use_depth_channel)
        self.net = EinNet(in_channels=2 + int(use_depth_channel), hidden=hidden, out_channels=2, stacks=stacks)
        self.start_at_identity()

    def forward_with(self, x: torch.Tensor, extra: torch.Tensor, depth: float, rank: int):
        channels = [rms_normalised(x), rms_normalised(extra)]
        if self.use_depth_channel:
            channels.append(torch.full_like(x, float(depth)))
        return self.adapter_from(torch.stack(channels), rank)


def residuals(layer: LayerData, w_base: torch.Tensor, u, v, step_size: float) -> tuple[torch.Tensor, ...]:
    """``||(G + dW) X^T||^2`` on the triggered and the clean rows, and ``||dW X^T||^2`` on each."""
    x = layer.rows.float()
    if layer.factors is None:
        delta = torch.zeros(x.shape[0], w_base.shape[0])
    else:
        delta = (x @ layer.factors[0].T) @ layer.factors[1].T
    if u is None:
        change = delta
    else:
        w_vt = w_base @ v.T
        if layer.factors is not None:
            w_vt = w_vt + layer.factors[1] @ (layer.factors[0] @ v.T)
        change = step_size * (x @ u.T) @ w_vt.T + delta
    t = layer.triggered
    return (
        change[:t].pow(2).sum(),
        change[t:].pow(2).sum(),
        delta[:t].pow(2).sum(),
        delta[t:].pow(2).sum(),
    )


def model_residual(data: ModelData, weights: dict, adapt, step_size: float) -> dict[str, torch.Tensor]:
    """``R`` over all rows, triggered rows and clean rows; ``adapt(layer) -> (U, V) | None``."""
    num_t = num_c = den_t = den_c = 0.0
    for layer in data.layers:
        u, v = adapt(layer) or (None, None)
        a, b, c, d = residuals(layer, weights[layer.name], u, v, step_size)
        num_t, num_c, den_t, den_c = num_t + a, num_c + b, den_t + c, den_c + d
    return {"all": (num_t + num_c) / (den_t + den_c), "triggered": num_t / den_t, "clean": num_c / den_c}


def generator_adapt(bank: dict, variant: str, rank: int):
    def adapt(layer: LayerData):
        generator = bank[layer.projection_type]
        if variant == "weights":
            return generator.forward_with(layer.reference, layer.weight_channel, layer.depth, rank)
        return generator(layer.reference, layer.depth, rank)

    return adapt


@torch.no_grad()
def evaluate(models: list[ModelData], weights: dict, adapt, step_size: float) -> dict[str, dict[str, float]]:
    return {
        m.model_id: {k: float(r) for k, r in model_residual(m, weights[m.base], adapt, step_size).items()}
        for m in models
    }


def train(variant: str, train_models, val_models, weights, meta, steps: int, lr: float, eval_every: int, seed: int):
    """Adam on the mean ``R`` of one model per step; the curve of train and validation ``R``."""
    torch.manual_seed(seed)
    cls = WeightAwareGenerator if variant == "weights" else AdapterGenerator
    bank = torch.nn.ModuleDict(
        {t: cls(meta.generator_hidden, meta.generator_stacks, meta.use_depth_channel) for t in PROJECTION_TYPES}
    )
    optimiser = torch.optim.Adam(bank.parameters(), lr=lr)
    adapt = generator_adapt(bank, variant, meta.rank)
    order = random.Random(seed)
    curve = []
    queue: list[ModelData] = []
    for step in tqdm(range(steps + 1), desc=variant, mininterval=30):
        if step % eval_every == 0 or step == steps:
            point = {
                "step": step,
                "train": evaluate(train_models, weights, adapt, meta.step_size),
                "validation": evaluate(val_models, weights, adapt, meta.step_size),
            }
            curve.append(point)
            print(
                f"{variant} step {step}: train R {median(point['train']):.4f}"
                f"  validation R {median(point['validation']):.4f}",
                flush=True,
            )
        if step == steps:
            break
        if not queue:
            queue = list(train_models)
            order.shuffle(queue)
        data = queue.pop()
        optimiser.zero_grad(set_to_none=True)
        loss = model_residual(data, weights[data.base], adapt, meta.step_size)["all"]
        loss.backward()
        optimiser.step()
    return curve


def fit_free(data: ModelData, weights: dict, rank: int, step_size: float, steps: int, lr: float) -> dict[str, float]:
    """Per-layer ``U, V`` fitted to the model's own ``dW`` (a floor, not a mitigation)."""
    torch.manual_seed(0)
    params = {
        layer.name: (
            (torch.randn(rank, layer.rows.shape[1]) / layer.rows.shape[1] ** 0.5).requires_grad_(),
            torch.zeros(rank, layer.rows.shape[1], requires_grad=True),
        )
        for layer in data.layers
    }
    optimiser = torch.optim.Adam([p for pair in params.values() for p in pair], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad(set_to_none=True)
        model_residual(data, weights, lambda layer: params[layer.name], step_size)["all"].backward()
        optimiser.step()
    with torch.no_grad():
        return {
            k: float(v) for k, v in model_residual(data, weights, lambda layer: params[layer.name], step_size).items()
        }


def median(per_model: dict[str, dict[str, float]], key: str = "all") -> float:
    return statistics.median(r[key] for r in per_model.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--farm", type=Path, required=True, help="a farm build folder (farm build OUT)")
    parser.add_argument("--scratch", type=Path, required=True, help="cache of each model's layer data")
    parser.add_argument("--metaparameters", type=Path, default=REPO_ROOT / "metaparameters.json")
    parser.add_argument("--variants", nargs="+", default=[*VARIANTS, "free"])
    parser.add_argument("--rows", type=int, default=128, help="token rows per layer, each of triggered and clean")
    parser.add_argument("--blocks", type=int, default=5, help="evenly spaced blocks whose layers take part")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="Adam; 1e-3 diverges")
    parser.add_argument("--eval_every", type=int, default=25)
    parser.add_argument("--free_steps", type=int, default=300)
    parser.add_argument("--cache_dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    unknown = set(args.variants) - {*VARIANTS, "free"}
    if unknown:
        raise SystemExit(f"error: --variants {sorted(unknown)}: use {[*VARIANTS, 'free']}")
    if min(args.rows, args.blocks, args.steps, args.eval_every, args.free_steps) < 1 or not args.learning_rate > 0:
        raise SystemExit("error: --rows, --blocks, --steps, --eval_every, --free_steps, --learning_rate: not positive")
    try:
        meta = load_meta(args.metaparameters, REPO_ROOT / "metaparameters_schema.json")
        spec = farm.load_spec(args.farm / "farm_spec.json")
        reference_texts = load_texts(REPO_ROOT / "learned_parameters").reference[: meta.num_reference_texts]
        models: list[ModelData] = []
        args.scratch.mkdir(parents=True, exist_ok=True)
        for model_spec in farm.plan(spec):
            record = farm.finished_record(args.farm / "models" / model_spec.model_id)
            if model_spec.split == "test" or not model_spec.poisoned or record is None or not record["passed"]:
                continue  # the test split is never looked at; clean fine-tunes have nothing to undo
            cached = args.scratch / f"{model_spec.model_id}-v{DATA_VERSION}-r{args.rows}.pt"
            if not cached.is_file():
                tick = time.time()
                data = prepare(model_spec, record, spec, args.farm, meta, reference_texts, args.rows, args.cache_dir)
                data.save(cached)
                print(f"{model_spec.model_id} ({model_spec.split}): data in {time.time() - tick:.0f} s", flush=True)
            models.append(ModelData.load(cached).in_blocks(args.blocks))
        weights = {
            base: base_weights(
                base_folder(base, args.farm / ".work", args.cache_dir), [layer.name for layer in m.layers]
            )
            for base, m in {m.base: m for m in models}.items()
        }
    except TeleLoRAError as err:
        raise SystemExit(f"error: {err}") from None
    train_models = [m for m in models if m.split == "train"]
    val_models = [m for m in models if m.split == "validation"]
    if not train_models or not val_models:
        raise SystemExit(f"error: {args.farm} needs built Trojans in both the train and the validation split")
    results = {}
    for variant in args.variants:
        tick = time.time()
        if variant == "free":
            per_model = {
                m.model_id: fit_free(m, weights[m.base], meta.rank, meta.step_size, args.free_steps, 1e-2)
                for m in tqdm(val_models, desc="free")
            }
            results[variant] = {"validation": per_model, "seconds": time.time() - tick}
        else:
            curve = train(variant, train_models, val_models, weights, meta, args.steps, args.learning_rate,
                          args.eval_every, meta.seed)  # fmt: skip
            results[variant] = {"curve": curve, "seconds": time.time() - tick}
    print_table(results, train_models, val_models)
    if args.out:
        payload = {
            "settings": {k: str(v) for k, v in vars(args).items()},
            "train_models": [m.model_id for m in train_models],
            "validation_models": [m.model_id for m in val_models],
            "results": results,
        }
        atomic_write_text(args.out, json.dumps(payload, indent=1))
        plot(results, args.out.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    """Per trained variant, the median train and validation ``R`` (each validation model thin)
    against the step, on a log scale; the free adapters' validation median as a dashed floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.5))
    for index, (variant, entry) in enumerate(results.items()):
        colour = f"C{index}"
        if variant == "free":
            axis.axhline(median(entry["validation"]), color=colour, ls="--", label="free adapters (validation)")
            continue
        steps = [p["step"] for p in entry["curve"]]
        axis.plot(steps, [median(p["train"]) for p in entry["curve"]], color=colour, ls=":", label=f"{variant} train")
        axis.plot(steps, [median(p["validation"]) for p in entry["curve"]], color=colour, label=f"{variant} validation")
        for model in entry["curve"][0]["validation"]:
            axis.plot(steps, [p["validation"][model]["all"] for p in entry["curve"]], color=colour, lw=0.4, alpha=0.4)
    axis.axhline(1.0, color="grey", lw=0.8)
    axis.set(xlabel="generator step", ylabel="R: share of the Trojan's change left", yscale="log")
    axis.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def print_table(results: dict, train_models, val_models) -> None:
    print(f"{len(train_models)} train and {len(val_models)} validation Trojans; medians over models")
    print("| variant | train R at start -> end | validation R at start -> end | validation R triggered / clean |")
    print("|---|---|---|---|")
    for variant, entry in results.items():
        if variant == "free":
            v = entry["validation"]
            row = f"1 -> {median(v):.3f} | {median(v, 'triggered'):.3f} / {median(v, 'clean'):.3f}"
            print(f"| free (fitted to each dW) | - | {row} |")
            continue
        first, last = entry["curve"][0], entry["curve"][-1]
        best = min(entry["curve"], key=lambda p: median(p["validation"]))
        train_r = f"{median(first['train']):.3f} -> {median(last['train']):.3f}"
        val_r = f"{median(first['validation']):.3f} -> {median(last['validation']):.3f}"
        val_best = f"best {median(best['validation']):.3f} at {best['step']}"
        parts = f"{median(last['validation'], 'triggered'):.3f} / {median(last['validation'], 'clean'):.3f}"
        print(f"| {variant} | {train_r} | {val_r} ({val_best}) | {parts} |")


if __name__ == "__main__":
    main()
