"""Meta-training checkpoints: everything ``configure --resume`` needs to continue exactly.

One file, ``<scratch>/configure/checkpoint.pt``, replaced atomically: the generators, the
optimizer, the step reached, every rank's random state and the loss log. A resumed run
replays the same model picks and batches from the saved random states, so it ends where
an uninterrupted run with the same seed ends. The fingerprint (metaparameters except
``train_iterations``, the model folders, the number of ranks) refuses a resume whose
inputs changed; raising ``train_iterations`` to train longer is allowed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from telelora.errors import TeleLoRAError

CHECKPOINT_FILE = "checkpoint.pt"


def path_in(scratch_dir: str | Path) -> Path:
    return Path(scratch_dir) / "configure" / CHECKPOINT_FILE


def save(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (a crash mid-write keeps the previous checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, fingerprint: dict) -> dict:
    """The saved state, checked against this run's ``fingerprint``."""
    if not path.is_file():
        raise TeleLoRAError(f"--resume: no checkpoint at {path}; start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["fingerprint"]
    except Exception as err:  # torch raises many types for a damaged file
        raise TeleLoRAError(f"{path} is not a readable checkpoint ({err}); delete it and start again") from err
    if saved != fingerprint:
        changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        raise TeleLoRAError(
            f"{path} was written by a run with other inputs (changed: {', '.join(changed)}); "
            "resume with the same metaparameters, models and number of processes, or start without --resume"
        )
    return state
