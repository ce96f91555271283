"""The picture of a meta-training run: did it learn, on every model?

Reads what ``configure`` leaves in ``SCRATCH/configure/`` (``losses.json``: every
iteration; ``monitor.json``: each model's loss on all its examples with no adapter,
at the start, at every checkpoint and at the end) and draws ``training.png`` beside them:

* left: the iterations' mean loss and its running mean over 10 iterations;
* middle: each model's monitor loss minus its identity (no adapter) loss, against the
  step: below 0 the generators help that model, above 0 they hurt it (a model that needs
  no change starts at the optimum, loss 0);
* right, when the run validated: the validation models' strict Fidelity at each
  checkpoint (mean, and each model thin), the step that ships marked.

    python -m telelora.lab.curves SCRATCH/configure

``configure`` draws it at the end of a run when matplotlib (the ``lab`` extra) is installed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from telelora.errors import TeleLoRAError

PLOT_FILE = "training.png"
WINDOW = 10


def running_mean(values: list[float], window: int = WINDOW) -> list[float]:
    """The mean of each value and up to ``window - 1`` before it."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / (i - max(0, i - window + 1) + 1) for i in range(len(values))]


def relative_curves(monitor: dict) -> dict[str, tuple[list[int], list[float]]]:
    """Per model, the monitor steps and its loss there minus its identity loss."""
    curves = {}
    for name, identity in sorted(monitor["identity"].items()):
        points = [(e["step"], e["losses"][name] - identity) for e in monitor["evaluations"] if name in e["losses"]]
        curves[name] = ([s for s, _ in points], [r for _, r in points])
    return curves


def plot(folder: str | Path) -> Path:
    """Draw ``training.png`` in ``folder`` (a ``SCRATCH/configure`` folder); return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    try:
        records = json.loads((folder / "losses.json").read_text())
        monitor = json.loads((folder / "monitor.json").read_text())
    except (OSError, ValueError) as err:
        message = f"{folder} holds no readable losses.json and monitor.json of a configure run ({err})"
        raise TeleLoRAError(message) from err
    validated = bool(monitor.get("validation"))
    fig, axes = plt.subplots(1, 3 if validated else 2, figsize=(18 if validated else 12, 4.5))
    left, middle = axes[0], axes[1]
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    left.plot(steps, losses, color="0.75", linewidth=0.8, label="iteration")
    left.plot(steps, running_mean(losses), color="C0", label=f"running mean ({WINDOW})")
    left.set(title="meta-training loss", xlabel="iteration", ylabel="alignment loss")
    left.legend(fontsize="small")
    for name, (xs, ys) in relative_curves(monitor).items():
        middle.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=name)
    middle.axhline(0.0, color="k", linestyle="--", linewidth=0.8)
    middle.set(title="per model, all its examples", xlabel="iteration", ylabel="loss - loss with no adapter")
    if len(monitor["identity"]) <= 12:
        middle.legend(fontsize="x-small")
    if validated:
        _plot_validation(axes[2], monitor["validation"], monitor.get("best_step"))
    fig.tight_layout()
    path = folder / PLOT_FILE
    save_figure(fig, path, dpi=110)
    return path


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Write ``fig`` as a PNG atomically (a half-written plot never replaces a whole one) and close it."""
    import matplotlib.pyplot as plt

    staging = path.with_name(f".{path.name}.tmp")
    fig.savefig(staging, format="png", dpi=dpi)
    plt.close(fig)
    os.replace(staging, path)


def _plot_validation(axis, validation: list[dict], best_step: int | None) -> None:
    steps = [v["step"] for v in validation]
    for name in sorted(validation[0]["models"]):
        axis.plot(steps, [v["models"][name]["strict_fidelity"] for v in validation], color="0.8", linewidth=0.8)
    means = [v["mean_strict_fidelity"] for v in validation]
    axis.plot(steps, means, color="C3", marker="o", markersize=4, label="mean over validation models")
    if best_step is not None:
        axis.axvline(best_step, color="C3", linestyle=":", linewidth=0.8, label=f"ships: step {best_step}")
    axis.set(title="validation strict Fidelity", xlabel="iteration", ylabel="strict Fidelity", ylim=(-0.05, 1.05))
    axis.legend(fontsize="small")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="SCRATCH/configure of a configure run")
    args = parser.parse_args(argv)
    try:
        print(plot(args.folder))
    except TeleLoRAError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
