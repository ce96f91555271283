"""The picture of a meta-training run: did it learn, on every model?

Reads what ``configure`` leaves in ``SCRATCH/configure/`` (``losses.json``: every
iteration; ``monitor.json``: each model's loss on its fixed monitor batch with no adapter,
at the start, at every checkpoint and at the end) and draws ``training.png`` beside them:

* left: the iterations' mean loss and its running mean over 10 iterations;
* right: each model's monitor loss divided by its identity (no adapter) loss, against the
  step: below 1 the generators help that model, above 1 they hurt it.

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
    """Per model, the monitor steps and its loss there divided by its identity loss."""
    curves = {}
    for name, identity in sorted(monitor["identity"].items()):
        points = [(e["step"], e["losses"][name] / identity) for e in monitor["evaluations"] if name in e["losses"]]
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
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    left.plot(steps, losses, color="0.75", linewidth=0.8, label="iteration")
    left.plot(steps, running_mean(losses), color="C0", label=f"running mean ({WINDOW})")
    left.set(title="meta-training loss", xlabel="iteration", ylabel="alignment loss")
    left.legend(fontsize="small")
    for name, (xs, ys) in relative_curves(monitor).items():
        right.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=name)
    right.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
    right.set(title="per model, fixed batch", xlabel="iteration", ylabel="loss / loss with no adapter")
    if len(monitor["identity"]) <= 12:
        right.legend(fontsize="x-small")
    fig.tight_layout()
    path = folder / PLOT_FILE
    staging = path.with_name(f".{path.name}.tmp")
    fig.savefig(staging, format="png", dpi=110)
    plt.close(fig)
    os.replace(staging, path)
    return path


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
