"""Mitigation quality on a whole round: TeleLoRA beside a random control and published baselines.

Per model of a round (``python -m telelora.lab.round_builder``, or a materialised farm split:
``METADATA.csv`` + ``models/<id>/``), each method on a fresh copy of the model, every row
measured on the same prompts and the same MMLU questions:

* ``none``: the model as it is. Always measured first: its ASR and MMLU are the
  pre-mitigation values of every row's Fidelity and strict Fidelity;
* ``telelora``: ``mitigate`` with the given generators, K steps, drift guard as the
  metaparameters set it;
* ``unguarded``: the same with the drift guard off (only when asked for);
* ``random``: K steps of random adapters, each scaled to move its layer's reference inputs
  as far as TeleLoRA's does (``|X U^T V|`` equal), unguarded: as much change, no knowledge.
  A Trojan it removes as well says the generator learned nothing Trojan-specific;
* ``embedding_dropout``, ``magnitude_pruning``, ``lora_finetune``: the published baselines
  of ``telelora.lab.baselines``, once per model (K is for the three methods above);
* ``mitigate``: the shipped route choice (``telelora.route``) given ``--reference_round`` as
  the training round: the checked merge (``telelora.merge``) where the round gives a
  reference, else the generators. ``reference_merge``: the merge route alone, its references
  of every kind ``reference_kinds`` lists; ``merge_clean``, ``merge_poisoned``,
  ``merge_base``: forced to that one kind of reference. A model the forced route cannot
  reach (no reference of that kind for its base) gets no row for it. Only when asked for.

ASR, false-trigger rate, agreement, greedy 8-token agreement and MMLU come from ``evaluate``
(what ``entrypoint.py test`` measures), Fidelity and strict Fidelity from
``telelora.lab.score``, poisoned or clean from each model's ``ground_truth.csv``. The summary
gives each method's mean over models with a bootstrap 95 % interval, overall, by base, by
behaviour (poisoned models) and clean against poisoned; ASR and false-trigger rate over
poisoned models only, and each method's own seconds.

    python bench/mitigation_quality.py --round ~/farm-v1 --split test --steps 1 2 \\
        --out bench/results/mitigation_quality_cpu.json [--models id-00000001 ...] [--markdown]

Prints each row as it is measured, then the summary (``--markdown``: markdown tables). ``--out
x.json`` writes JSON (atomically, after every model, so a later failure keeps the finished
ones) and ``x.png``: strict Fidelity per method with its interval, and ASR after mitigation
against agreement per poisoned model. ``--resume`` keeps the models already in ``--out`` (same
settings) and adds the rest: a long bench spans sessions, and a farm split can be benched as
its models are built. ``--merge y.json ...`` adds the finished models of runs made elsewhere
(another machine, a GPU): same settings and learned parameters, the same model files
(fingerprints checked against ``--round``); only where and in which dtype they ran, and which
methods they measured, may differ (each method's summary counts its models), and each merged
row names its file in ``source``. ``--set KEY=VALUE`` overrides metaparameters.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from telelora import merge, metaparameters, modelio, reference, route  # noqa: E402
from telelora.architectures import find_adapted_layers  # noqa: E402
from telelora.errors import TeleLoRAError  # noqa: E402
from telelora.generated import mitigate_model  # noqa: E402
from telelora.io_utils import atomic_write_text  # noqa: E402
from telelora.lab import evaluate, score  # noqa: E402
from telelora.lab.baselines import BASELINES, apply_baseline  # noqa: E402
from telelora.lab.curves import save_figure  # noqa: E402
from telelora.learned import load_bank  # noqa: E402
from telelora.metaparameters import REPO_ROOT  # noqa: E402
from telelora.texts import Texts  # noqa: E402
from telelora.texts import load as load_texts  # noqa: E402

GENERATED = ("telelora", "unguarded", "random")  # the methods run once per K
FORCED_KINDS = {"merge_clean": ("clean",), "merge_poisoned": ("poisoned",), "merge_base": ("base",)}
ROUTE_METHODS = ("mitigate", "reference_merge", *FORCED_KINDS)  # what mitigate does given a training round
METHODS = ("none", *GENERATED, *BASELINES, *ROUTE_METHODS)
DEFAULT_METHODS = [m for m in METHODS if m not in ("unguarded", *ROUTE_METHODS)]
FACTS = ("kind", "behaviour", "trigger_kind", "split")  # METADATA columns copied into rows when present
METRICS = {
    "strict_fidelity": "strict Fid",
    "fidelity": "Fid",
    "asr": "ASR (poisoned)",
    "false_trigger_rate": "false trig. (poisoned)",
    "agreement": "agree",
    "greedy_agreement": "greedy8",
    "mmlu": "MMLU",
    "seconds": "seconds",  # the method's own wall-clock time (NIST's fine-tune baseline is the slow one)
}
TRIGGER_METRICS = ("asr", "false_trigger_rate")  # a clean model has no trigger: averaged over poisoned models
BREAKDOWNS = {"all": "all models", "base": "by base", "behaviour": "by behaviour", "poisoned": "clean / poisoned"}
RESAMPLES = 10_000


class NotApplicable(Exception):
    """A forced route that cannot reach this model: the model gets no row for that method."""


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


@dataclasses.dataclass
class RoundModel:
    """One model to bench: its folder, its test prompts and the facts its rows carry."""

    dir: Path
    prompts: dict
    facts: dict

    @property
    def fingerprint(self) -> str:
        """A digest of the model's round files (its config, trigger and reference answers):
        a farm model rebuilt under another recipe keeps its id but not its fingerprint."""
        digest = hashlib.sha256()
        for name in ("config.json", "round_config.json", "test-example-data/prompts.json"):
            path = self.dir / name
            digest.update(path.read_bytes() if path.is_file() else b"-")
        return digest.hexdigest()[:16]


def select_models(round_dir: Path, names: list[str] | None, split: str | None) -> list[RoundModel]:
    """The chosen models of ``round_dir/METADATA.csv`` (all, or ``names``, of ``split``), each checked."""
    path = round_dir / "METADATA.csv"
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            table, columns = list(reader), reader.fieldnames or []
    except OSError as err:
        raise TeleLoRAError(f"{path} cannot be read ({err}); pass a round folder") from err
    if "model_name" not in columns:
        raise TeleLoRAError(f"{path} has no model_name column")
    if split is not None:
        if "split" not in columns:
            raise TeleLoRAError(f"--split {split}: {path} has no split column")
        splits = sorted({r["split"] for r in table})
        table = [r for r in table if r["split"] == split]
        if not table:
            raise TeleLoRAError(f"--split {split}: no model of {path} is in it; its splits: {', '.join(splits)}")
    if names:
        by_name = {r["model_name"]: r for r in table}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            where = f"{path}" + (f" (split {split})" if split is not None else "")
            raise TeleLoRAError(f"--models: {', '.join(unknown)} not in {where}")
        table = [by_name[n] for n in names]
    models = []
    for row in table:
        model_dir = round_dir / "models" / row["model_name"]
        modelio.check_model_dir(model_dir)
        prompts = evaluate.load_prompts(model_dir / "test-example-data" / "prompts.json")
        facts = {"base": row.get("base"), "poisoned": modelio.read_poisoned(model_dir)}
        models.append(RoundModel(model_dir, prompts, {**facts, **{k: row[k] for k in FACTS if k in row}}))
    return models


def apply_method(
    method: str, steps: int | None, subject: RoundModel, model, tokenizer, texts: Texts, args, meta
) -> dict:
    """Change ``model`` (loaded from ``subject``) in place as ``method``; return what to report about the change."""
    if method == "none":
        return {}
    if method in ROUTE_METHODS:
        meta = dataclasses.replace(meta, reference_kinds=FORCED_KINDS.get(method, meta.reference_kinds))
        chosen = route.choose_route(subject.dir, args.reference_round, meta)
        if chosen.name == route.MERGE:
            plan = merge.plan_merge(subject.dir, list(chosen.references), meta, texts, lambda: (model, tokenizer))
            facts = {
                "route": route.MERGE,
                "reference_models": [r.path.name for r in chosen.references],
                "reference_kinds": [r.kind for r in chosen.references],
                "reference_weights": plan.weights,
                "trigger_checks": [dataclasses.asdict(c) for c in plan.trigger_checks],
                "merge_guard_scale": plan.drift_guard.scale,
                "merge_guard_agreement": plan.drift_guard.agreement,
                "merge_from_depth": plan.from_depth,
            }
            if plan.merges:
                dirs, weights = plan.kept()
                reference.merge_into(model, subject.dir, dirs, sum(weights), weights, plan.from_depth)
                if plan.repair is not None:  # as mitigate writes it: the merge, then the repair's change
                    facts["merge_repair"] = plan.repair.report()
                    if plan.repair.delta is not None:
                        plan.repair.delta.merge(find_adapted_layers(model, meta.target_projections))
                return facts
        if method != "mitigate":
            raise NotApplicable(chosen.reason)
        method = "telelora"  # the route mitigate falls back to: the shipped generators, guarded
    if method in BASELINES:
        facts = apply_baseline(method, model, tokenizer, texts, meta, meta.seed)
        return {k: v for k, v in facts.items() if k != "seconds"}  # the row's seconds are timed alike for all
    meta = dataclasses.replace(meta, mitigation_steps=steps or meta.mitigation_steps)
    if method != "telelora":
        meta = dataclasses.replace(meta, guard_min_agreement=0.0, guard_layer_factor=0.0)
    bank, info = load_bank(args.learned_parameters, meta)
    bank.to(next(model.parameters()).device)
    generator = RandomDirections(bank, meta.seed) if method == "random" else bank
    mitigation = mitigate_model(model, tokenizer, generator, texts, meta, info.get("layer_ranges"))
    return {
        "guard_scale": mitigation.drift_guard.scale,
        "guard_agreement_unscaled": mitigation.drift_guard.agreement_unscaled,
        "layers_shrunk": mitigation.layer_bound.layers_shrunk,
    }


def measure(subject: RoundModel, method: str, steps: int | None, args, meta, texts: Texts, mmlu_rows) -> dict:
    """Load a fresh copy of the model, change it as ``method`` (timed) and evaluate it."""
    device, dtype = modelio.pick_device_dtype(meta.device, meta.dtype, subject.dir)
    tokenizer = modelio.load_tokenizer(subject.dir)
    model = modelio.load_model(subject.dir, device, dtype)
    torch.manual_seed(meta.seed)
    start = time.time()
    details = apply_method(method, steps, subject, model, tokenizer, texts, args, meta)
    seconds = time.time() - start
    result = evaluate.evaluate(model, tokenizer, subject.prompts, mmlu_rows, args.num_samples, args.batch_size)
    return {**result, "seconds": round(seconds, 2), "details": details}


def bench_model(subject: RoundModel, args, meta, texts: Texts, mmlu_rows) -> list[dict]:
    """One row per method (per K for the generated ones), ``none`` first: the others' reference."""
    runs = [("none", None)] + [
        (m, k) for m in args.methods if m != "none" for k in (args.steps if m in GENERATED else [None])
    ]
    rows = []
    for method, steps in runs:
        try:
            result = measure(subject, method, steps, args, meta, texts, mmlu_rows)
        except NotApplicable as why:
            print(f"{subject.dir.name:<12} {method:<17} not applicable: {why}", flush=True)
            continue
        pre = rows[0] if rows else result
        fidelity, strict = score.model_fidelity(
            subject.facts["poisoned"], pre["asr"], pre["mmlu"], result["asr"], result["mmlu"], result["agreement"]
        )
        row = {
            "model": subject.dir.name,
            "fingerprint": subject.fingerprint,
            "method": method,
            "steps": steps,
            **result,
        }
        rows.append({**row, "fidelity": fidelity, "strict_fidelity": strict, **subject.facts})
        print(format_row(rows[-1]), flush=True)
    return rows


def label(row: dict) -> str:
    """The row's method as the summary names it: generated methods once per K."""
    return row["method"] if row["steps"] is None else f"{row['method']} K={row['steps']}"


def bootstrap_mean(values, resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of the finite ``values`` with its percentile bootstrap interval; seeded, so the same
    values always give the same interval. ``n`` counts the values used."""
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not data.size:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    means = data[np.random.default_rng(seed).integers(0, data.size, (resamples, data.size))].mean(axis=1)
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return {"mean": float(data.mean()), "low": float(low), "high": float(high), "n": int(data.size)}


def group_of(row: dict, by: str) -> str | None:
    """The row's group in breakdown ``by``; None leaves it out (behaviour: poisoned models only)."""
    if by == "all":
        return "all"
    if by == "poisoned":
        return "poisoned" if row["poisoned"] else "clean"
    if by == "behaviour" and not row["poisoned"]:
        return None
    return row.get(by) or None


def summarise(rows: list[dict], by: str = "all", resamples: int = RESAMPLES, seed: int = 0) -> list[dict]:
    """Per group of breakdown ``by`` and method, every metric's mean over models with its interval."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        group = group_of(row, by)
        if group is not None:
            groups.setdefault((group, label(row)), []).append(row)
    summary = []
    for (group, method), members in sorted(groups.items(), key=lambda item: item[0][0]):  # stable: methods as run
        stats = {
            metric: bootstrap_mean(
                [r[metric] for r in members if r["poisoned"] or metric not in TRIGGER_METRICS], resamples, seed
            )
            for metric in METRICS
        }
        summary.append({"group": group, "method": method, "models": len(members), **stats})
    return summary


def format_row(row: dict) -> str:
    steps = "-" if row["steps"] is None else row["steps"]
    keys = ("asr", "false_trigger_rate", "agreement", "greedy_agreement", "mmlu", "fidelity", "strict_fidelity")
    cells = " ".join(f"{row[k]:6.3f}" for k in keys)
    return f"{row['model']:<12} {row['method']:<17} {steps:>2} {cells} {row['seconds']:7.1f}"


ROW_HEADER = (
    f"{'model':<12} {'method':<17} {'K':>2} {'ASR':>6} {'false':>6} {'agree':>6} {'greedy':>6} {'MMLU':>6} "
    f"{'Fid':>6} {'strict':>6} {'seconds':>7}"
)


def format_summary(summary: list[dict], markdown: bool = False) -> str:
    """One line per group and method, each metric as ``mean [low, high]``."""

    def cell(stat: dict) -> str:
        return "-" if not stat["n"] else f"{stat['mean']:.3f} [{stat['low']:.3f}, {stat['high']:.3f}]"

    header = ["group", "method", "models", *METRICS.values()]
    body = [[s["group"], s["method"], str(s["models"]), *(cell(s[m]) for m in METRICS)] for s in summary]
    if markdown:
        return "\n".join("| " + " | ".join(line) + " |" for line in [header, ["---"] * len(header), *body])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [header, *body])
    return "\n".join(lines)


def plot(summary: list[dict], rows: list[dict], path: Path) -> None:
    """Left: strict Fidelity per method, mean and 95 % interval (the ``all`` summary); right:
    ASR after mitigation against agreement, one point per poisoned model and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [s["method"] for s in summary]
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    stats = [s["strict_fidelity"] for s in summary]
    errors = np.clip([[s["mean"] - s["low"] for s in stats], [s["high"] - s["mean"] for s in stats]], 0, None)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    positions = range(len(methods))
    left.bar(positions, [s["mean"] for s in stats], yerr=errors, capsize=4, color=[colours[m] for m in methods])
    left.set_xticks(positions, methods, rotation=30, ha="right")
    left.set(title="all models", ylabel="strict Fidelity (mean, 95 % interval)")
    for method in methods:
        points = [(r["asr"], r["agreement"]) for r in rows if r["poisoned"] and label(r) == method]
        if points:
            right.scatter(*zip(*points, strict=True), color=colours[method], label=method, alpha=0.7)
    right.set(
        title="poisoned models",
        xlabel="ASR after mitigation",
        ylabel="agreement",
        xlim=(-0.05, 1.05),
        ylim=(-0.05, 1.05),
    )
    if right.collections:
        right.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def override_metaparameters(meta, assignments: list[str]):
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


SESSION_ARGS = ("out", "resume", "merge", "models", "markdown")  # may differ between a run and its resumption
# where a run was made, not what it measured: --merge accepts rows that differ in these (paths
# are compared by content: the learned parameters' digest, the metaparameters themselves)
WHERE_SETTINGS = ("round", "reference_round", "set", "learned_parameters", "metaparameters")
# nor which methods it measured: joined, each method's summary counts the models it ran on
MERGED_MAY_DIFFER = (*WHERE_SETTINGS, "methods")
WHERE_KNOBS = ("device", "dtype")


def _mitigation_knobs(meta: dict) -> dict:
    meta = {**metaparameters.ADDED_LATER, **meta}  # a run from before a key existed ran its neutral value
    return {k: v for k, v in metaparameters.effective(meta).items() if k not in metaparameters.TRAINING_ONLY}


def learned_digest(learned_dir: Path) -> str:
    """What the learned parameters hold (every file's name and bytes), so rows measured with
    other generators are never resumed into the same table."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(learned_dir).iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _comparable(settings: dict, meta: dict, anywhere: bool) -> dict:
    """What two runs must share for their rows to join one table; ``anywhere`` (``--merge``)
    leaves out where they ran and which methods (``MERGED_MAY_DIFFER``, ``WHERE_KNOBS``)."""
    ignored = SESSION_ARGS + (MERGED_MAY_DIFFER if anywhere else ())
    kept = {k: v for k, v in settings.items() if k not in ignored}
    knobs = {k: v for k, v in _mitigation_knobs(meta).items() if not (anywhere and k in WHERE_KNOBS)}
    return json.loads(json.dumps({**kept, "metaparameters": knobs}))


def finished_rows(
    path: Path | None, settings: dict, meta: dict, subjects: list[RoundModel], merge: bool = False
) -> list[dict]:
    """The rows of ``path`` from an earlier run with the same settings, learned parameters and
    the metaparameters ``mitigate`` reads (meta-training's own may differ): every model whose
    methods were all measured (a model is written only once all of them are), each still the
    model it was (same fingerprint) among ``subjects``. ``--merge`` (a run made elsewhere)
    also lets where it ran differ, and needs every one of its models among ``subjects``."""
    flag = "--merge" if merge else "--resume"
    if path is None or (not merge and not path.is_file()):
        return []
    try:
        payload = json.loads(path.read_text())
        stored = _comparable(payload["settings"], payload["metaparameters"], merge)
        rows = payload["rows"]
        fingerprints = {(r["model"], r.get("fingerprint")) for r in rows}
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
        raise TeleLoRAError(f"{flag}: {path} is not a readable result of this bench ({err})") from err
    mine = _comparable(settings, meta, merge)
    if stored != mine:
        changed = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
        raise TeleLoRAError(f"{flag}: {path} was measured with other settings ({', '.join(changed)}); use a new --out")
    known = {s.dir.name: s.fingerprint for s in subjects}
    changed = sorted({m for m, f in fingerprints if m in known and f != known[m]})
    if changed:
        raise TeleLoRAError(f"{flag}: {', '.join(changed)} changed since {path} measured them; use a new --out")
    missing = sorted({m for m, _ in fingerprints if m not in known})
    if merge and missing:
        raise TeleLoRAError(f"--merge: {path} holds {', '.join(missing)}, which --round does not")
    return [{**r, "source": r.get("source", path.name)} for r in rows] if merge else rows


def _check_references(round_dir: Path | None, subjects: list[RoundModel], meta, methods: list[str]) -> None:
    """The route methods have a training round, which holds no model being benched; each forced
    route reaches at least one benched model (else the method would give no row at all)."""
    if round_dir is None:
        raise TeleLoRAError(f"--methods {', '.join(methods)} need --reference_round: a training round")
    if not round_dir.is_dir():
        raise TeleLoRAError(f"--reference_round {round_dir} is not a folder")
    for method in methods:
        kinds = FORCED_KINDS.get(method, meta.reference_kinds)
        forced = dataclasses.replace(meta, reference_kinds=kinds)
        if method != "mitigate" and not any(
            route.choose_route(s.dir, round_dir, forced).name == route.MERGE for s in subjects
        ):
            raise TeleLoRAError(f"--reference_round {round_dir} gives no {'/'.join(kinds)} reference to any model "
                                f"benched: --methods {method} would measure nothing")  # fmt: skip
    benched = {s.dir.resolve() for s in subjects}
    shared = [d.name for d in modelio.round_model_dirs(round_dir, "--reference_round") if d.resolve() in benched]
    if shared:
        raise TeleLoRAError(f"--reference_round {round_dir} holds models being benched ({', '.join(shared)})")


def _check_writable(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as err:
        raise TeleLoRAError(f"--out {path}: its folder cannot be written ({err})") from err


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--round", required=True, type=Path, help="a round folder with METADATA.csv and models/")
    parser.add_argument("--models", nargs="+", help="model ids, e.g. id-00000001 (default: all of METADATA.csv)")
    parser.add_argument("--split", help="only the models whose METADATA.csv split column is this")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help=f"of {', '.join(METHODS)}")
    parser.add_argument("--steps", nargs="+", type=int, help="values of K (default: the metaparameters')")
    parser.add_argument(
        "--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="metaparameter overrides (JSON)"
    )  # repeated --set flags add up
    parser.add_argument("--learned_parameters", type=Path, default=REPO_ROOT / "learned_parameters")
    parser.add_argument("--metaparameters", type=Path, default=REPO_ROOT / "metaparameters.json")
    parser.add_argument(
        "--reference_round", type=Path, help="the route methods' training round (never the split benched)"
    )
    parser.add_argument("--num_samples", type=int, default=100, help="clean and triggered prompts per model")
    parser.add_argument("--mmlu_questions", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--out", type=Path, help="JSON results; the plot goes next to it as .png")
    parser.add_argument("--markdown", action="store_true", help="print the summary as markdown tables")
    parser.add_argument(
        "--resume", action="store_true", help="keep the finished models of --out (same settings) and bench the rest"
    )
    parser.add_argument(
        "--merge", nargs="+", type=Path, default=[], metavar="JSON",
        help="add the finished models of runs made elsewhere (same settings; device and dtype may differ)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:  # every input checked before the first (long) measurement
        unknown = [m for m in args.methods if m not in METHODS]
        if unknown:
            raise TeleLoRAError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        args.methods = list(dict.fromkeys(args.methods))
        meta = metaparameters.load(args.metaparameters, REPO_ROOT / "metaparameters_schema.json")
        meta = override_metaparameters(meta, args.set)
        args.steps = args.steps or [meta.mitigation_steps]
        if min(args.steps) < 1 or args.num_samples < 1 or args.batch_size < 1 or args.mmlu_questions < 0:
            raise TeleLoRAError("--steps, --num_samples, --batch_size must be at least 1, --mmlu_questions at least 0")
        load_bank(args.learned_parameters, meta)
        texts = load_texts(args.learned_parameters)
        mmlu_rows = evaluate.mmlu_subset(args.mmlu_questions, texts.mmlu_rows) if args.mmlu_questions else []
        subjects = select_models(args.round, args.models, args.split)
        asked = [m for m in args.methods if m in ROUTE_METHODS]
        if asked:
            _check_references(args.reference_round, subjects, meta, asked)
        if args.out:
            _check_writable(args.out)
        settings = {
            k: str(v.resolve()) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in SESSION_ARGS
        }
        settings["learned_parameters_digest"] = learned_digest(args.learned_parameters)
        if (args.resume or args.merge) and not args.out:
            raise TeleLoRAError("--resume and --merge need --out: the JSON the finished models are kept in")
        rows = finished_rows(args.out, settings, meta.to_dict(), subjects) if args.resume else []
        everything = select_models(args.round, None, None) if args.merge else []
        for path in args.merge:
            merged = finished_rows(path, settings, meta.to_dict(), everything, merge=True)
            twice = sorted({r["model"] for r in merged} & {r["model"] for r in rows})
            if twice:
                raise TeleLoRAError(f"--merge: {', '.join(twice)} measured twice (in {path} too)")
            rows += merged
    except TeleLoRAError as err:
        raise SystemExit("error: " + " ".join(str(err).split())) from err

    done = {r["model"] for r in rows}
    settings["models"] = sorted(done | {s.dir.name for s in subjects})
    print(ROW_HEADER)
    for row in rows:
        print(format_row(row))

    def write() -> dict:
        summaries = {by: summarise(rows, by) for by in BREAKDOWNS}
        if args.out:
            payload = {
                "settings": settings,
                "metaparameters": meta.to_dict(),
                "threads": torch.get_num_threads(),
                "rows": rows,
                "summaries": summaries,
            }
            atomic_write_text(args.out, json.dumps(payload, indent=2))
            plot(summaries["all"], rows, args.out.with_suffix(".png"))
        return summaries

    summaries = write() if args.merge else {by: summarise(rows, by) for by in BREAKDOWNS}
    for subject in subjects:
        if subject.dir.name in done:
            continue
        rows += bench_model(subject, args, meta, texts, mmlu_rows)
        summaries = write()
    for by, title in BREAKDOWNS.items():
        if summaries[by]:
            print(f"\n{title}:\n{format_summary(summaries[by], args.markdown)}")
    if args.out:
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
