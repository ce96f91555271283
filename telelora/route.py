"""Which route ``mitigate`` takes, decided from what the round gives, in one visible order.

1. a merge toward references (``telelora.merge``), when ``reference_weight`` > 0 and any of
   the kinds ``reference_kinds`` lists is found (``telelora.reference``), by default in this
   order of preference: clean training models of the input's base, poisoned ones of that base
   whose triggers the round declares, a public base checkpoint shipped with the image;
2. otherwise the data-free generators (``telelora.generated``).

The merge route can still fall back to the generators after its checks (every reference's
weight dropped); ``telelora.mitigate`` does that and reports it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from telelora import reference
from telelora.metaparameters import REPO_ROOT, Metaparameters

log = logging.getLogger(__name__)
MERGE, GENERATORS = "reference_merge", "generators"


@dataclasses.dataclass(frozen=True)
class Route:
    """The route chosen for one model, the references it merges toward and why."""

    name: str
    references: tuple[reference.Reference, ...] = ()
    reason: str = ""


def base_models_dir(meta: Metaparameters) -> Path | None:
    """``base_models_dirpath`` as a folder (relative to the repository or container root), or None."""
    if not meta.base_models_dirpath:
        return None
    path = Path(meta.base_models_dirpath)
    return path if path.is_absolute() else REPO_ROOT / path


def choose_route(model_dir: Path, round_dir: Path | None, meta: Metaparameters) -> Route:
    """The route for ``model_dir`` given the training round ``round_dir`` (None when the
    harness passes none). Never raises for a bad round or reference: those are logged and the
    next kind, or the generators, are taken."""
    if meta.reference_weight <= 0 or not meta.reference_kinds:
        return Route(GENERATORS, reason="the merge is off (reference_weight 0 or no reference_kinds)")
    if round_dir is None and base_models_dir(meta) is None:
        return Route(GENERATORS, reason="no training round and no base checkpoint shipped")
    try:
        found = reference.find_references(
            round_dir, model_dir, meta.reference_count, tuple(meta.reference_kinds), base_models_dir(meta)
        )
    except Exception as err:  # a round or base folder that cannot be read must not cost the output
        log.error("NO REFERENCE MODEL: the references cannot be searched (%s); running the generators instead", err)
        return Route(GENERATORS, reason=f"reference search failed: {err}")
    if not found:
        given = "no training round" if round_dir is None else f"no usable reference in {round_dir}"
        return Route(GENERATORS, reason=f"{given} (kinds {list(meta.reference_kinds)})")
    kinds = ", ".join(f"{r.kind} {r.path.name}" for r in found)
    return Route(MERGE, tuple(found), reason=f"references found: {kinds}")
