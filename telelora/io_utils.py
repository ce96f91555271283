"""Atomic file and folder writes: a reader sees the old content or the new, never half."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; others (a container user) must read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def staging_dir(final: str | Path) -> Path:
    """A fresh sibling folder of ``final`` to build into before :func:`publish_dir`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def publish_dir(staging: Path, final: str | Path) -> None:
    """Move a finished ``staging`` folder to ``final``, replacing what was there.

    A plain rename when ``final`` is absent; otherwise the old folder is renamed aside
    first and removed only after the new one is in place. If ``final`` cannot be renamed
    (a mount point, say), its files are replaced one by one, each atomically.
    """
    final = Path(final)
    for path in staging.rglob("*"):  # some writers (safetensors) create 0600 files
        if path.is_file() and path.stat().st_nlink > 1:
            continue  # a hard link shares its mode with the original: never change the input's
        path.chmod(0o755 if path.is_dir() else 0o644)
    staging.chmod(0o755)
    if not final.exists():
        os.replace(staging, final)
        return
    backup = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(final, backup)
    except OSError:
        _replace_contents(staging, final)
        shutil.rmtree(staging, ignore_errors=True)
        return
    try:
        os.replace(staging, final)
    except OSError:
        os.replace(backup, final)  # put the old folder back
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Build a folder in a staging sibling and publish it to ``final`` only if the block succeeds."""
    staging = staging_dir(final)
    try:
        yield staging
        publish_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_contents(src: Path, dst: Path) -> None:
    for entry in dst.iterdir():
        if not (src / entry.name).exists():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.is_dir():
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(entry), str(target))
        else:
            tmp = dst / f".{entry.name}.tmp-{uuid.uuid4().hex[:8]}"
            shutil.copyfile(entry, tmp)
            os.replace(tmp, target)
