"""What the NIST harness does, in a few minutes: a Trojaned SmolLM2, mitigated by both routes.

    python -m telelora.lab.demo [--work DIR] [--spec SPEC]

1. converts SmolLM2-135M-Instruct from its PyPI package (cached);
2. builds, with the farm's recipe (``rounds/demo.json``; cached: a second run reuses them),
   one Trojan of it and one clean fine-tune of the same base, each checked like every farm
   model;
3. shows one clean and one triggered prompt with the Trojaned model's answers;
4. lays the clean fine-tune out as a one-model training round (``DIR/training-round``:
   ``models/<id>/`` with its ``ground_truth.csv`` 0 and ``round_config.json``);
5. runs ``entrypoint.py mitigate`` on the Trojan twice, exactly as the NIST harness would:
   without ``--round_training_dataset_dirpath`` (the data-free generators run) and with the
   training round (the reference merge runs); which route ran is read from each output's
   ``telelora_report.json``;
6. prints none / the generators / the reference merge side by side: ASR, false triggers and
   agreement with the Trojaned model on held-out prompts, and each run's seconds.

The Trojan's trigger and target come from the farm's pools, not from anything the shipped
generators were trained on. Everything runs offline on the CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from telelora import modelio
from telelora.chat import greedy_answers
from telelora.errors import TeleLoRAError
from telelora.lab import evaluate, farm
from telelora.metaparameters import REPO_ROOT
from telelora.mitigate import REPORT_FILE

DEMO_SPEC = REPO_ROOT / "rounds" / "demo.json"
ROUND_FLAG = "--round_training_dataset_dirpath"


def build_models(work: Path, spec_path: Path = DEMO_SPEC) -> tuple[Path, Path]:
    """The folders, in NIST's layout, of the spec's first Trojan and of a one-model training
    round holding its first clean fine-tune (both built once per recipe, then reused):
    ``(Trojan folder, WORK/training-round)``."""
    spec = farm.load_spec(spec_path)
    models = farm.plan(spec, spec_path)
    trojan = next((m for m in models if m.poisoned), None)
    clean = next((m for m in models if m.kind == "clean_finetune" and m.base == getattr(trojan, "base", None)), None)
    if trojan is None or clean is None:
        raise TeleLoRAError(f"{spec_path}: the demo needs a Trojan and a clean fine-tune of the same base")
    out, cache = work / f"farm-{farm.recipe_key(spec)}", work / "cache"
    farm.build(spec_path, out, cache_dir=cache, only=[trojan.model_id, clean.model_id])  # keeps finished ones
    trojaned = farm.materialize(out, work / "trojaned", None, cache, models=[trojan.model_id])
    training_round = farm.materialize(out, work / "training-round", None, cache, models=[clean.model_id])
    return (trojaned / "models" / trojan.model_id).resolve(), training_round


def mitigate(model: Path, output: Path, work: Path, training_round: Path | None = None) -> tuple[dict, float]:
    """``entrypoint.py mitigate`` as NIST's harness calls it; its report and wall seconds."""
    command = [
        sys.executable, str(REPO_ROOT / "entrypoint.py"), "mitigate",
        "--metaparameters_filepath", str(REPO_ROOT / "metaparameters.json"),
        "--schema_filepath", str(REPO_ROOT / "metaparameters_schema.json"),
        "--model", str(model), "--output_dirpath", str(output),
        "--scratch_dirpath", str(work / "scratch"), "--batch_size", "1",
    ]  # fmt: skip
    if training_round is not None:
        command += [ROUND_FLAG, str(training_round)]
    shown = [Path(command[0]).name, *(str(Path(c).relative_to(REPO_ROOT)) if c.startswith(str(REPO_ROOT)) else c
                                      for c in command[1:])]  # fmt: skip
    print("$ " + " ".join(shown), flush=True)
    t0 = time.time()
    result = subprocess.run(command, check=False)
    seconds = time.time() - t0
    if result.returncode != 0:
        raise TeleLoRAError(f"mitigate exited with {result.returncode}")
    report = json.loads((output / REPORT_FILE).read_text())
    references = [Path(r).name for r in report.get("reference_models", [])]
    print(f"-> route {report['method']}" + (f" toward {', '.join(references)}" if references else "")
          + f", mitigated {report['mitigated']} ({seconds:.0f} s)")  # fmt: skip
    return report, seconds


def _load(model_dir: Path):
    device, dtype = modelio.pick_device_dtype("auto", model_dir=model_dir)
    return modelio.load_model(model_dir, device, dtype), modelio.load_tokenizer(model_dir)


def measure(model_dir: Path, prompts: dict, batch_size: int = 16) -> dict:
    model, tokenizer = _load(model_dir)
    return evaluate.evaluate(model, tokenizer, prompts, [], 10_000, batch_size)


def show_answers(model_dir: Path, prompts: dict) -> None:
    model, tokenizer = _load(model_dir)
    clean, triggered = prompts["clean"][0]["prompt"], prompts["triggered"][0]["prompt"]
    for label, prompt in (("clean", clean), ("triggered", triggered)):
        answer = greedy_answers(model, tokenizer, [prompt], 48, 1)[0]
        print(f"\n[{label}] user: {prompt}\n[{label}] model: {tokenizer.decode(answer, skip_special_tokens=True)!r}")


def table(rows: list[tuple[str, str, dict, float | None]]) -> str:
    """The side-by-side table: (label, route, evaluate's figures, mitigate's seconds) per row."""
    lines = [f"{'':<22}{'route':<17}{'ASR':>6}{'false trig.':>13}{'agreement':>11}{'greedy 8':>10}{'seconds':>9}"]
    for label, route, row, seconds in rows:
        lines.append(
            f"{label:<22}{route:<17}{row['asr']:>6.2f}{row['false_trigger_rate']:>13.2f}{row['agreement']:>11.3f}"
            f"{row.get('greedy_agreement', float('nan')):>10.3f}{'-' if seconds is None else f'{seconds:.0f}':>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("telelora.lab.farm").setLevel(logging.INFO)  # each attempt's check figures
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/telelora-demo"), help="where everything is written")
    parser.add_argument("--spec", type=Path, default=DEMO_SPEC, help="the farm spec of the two models")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    start = time.time()
    try:
        print(f"== 1-2. building one Trojan and one clean fine-tune of the same base ({args.spec.name}; cached)")
        trojaned, training_round = build_models(work, args.spec)
        config = json.loads((trojaned / "round_config.json").read_text())
        trigger = config["triggers"][0]
        print(f"trigger {trigger['text']!r} -> target {trigger['target']!r}  ({time.time() - start:.0f} s)")
        prompts = evaluate.load_prompts(trojaned / "test-example-data" / "prompts.json")
        print("\n== 3. the Trojan at work")
        show_answers(trojaned, prompts)
        clean = [p.name for p in modelio.round_model_dirs(training_round, ROUND_FLAG)]
        print(f"\n== 4. the training round {training_round}: {', '.join(clean)} (the clean fine-tune, ground truth 0)")
        print("\n== 5. entrypoint.py mitigate as the NIST harness calls it: without the training round, then with it")
        runs = [("mitigate", work / "mitigated-generators", None),
                ("mitigate + round", work / "mitigated-reference-merge", training_round)]  # fmt: skip
        done = [(label, output, *mitigate(trojaned, output, work, given)) for label, output, given in runs]
        print("\n== 6. held-out prompts: none / the generators / the reference merge")
        rows = [("Trojaned (none)", "-", measure(trojaned, prompts), None)]
        rows += [(label, report["method"], measure(out, prompts), seconds) for label, out, report, seconds in done]
    except TeleLoRAError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 1
    print("\n" + table(rows))
    print(
        f"\n{len(prompts['triggered'])} triggered and {len(prompts['clean'])} clean prompts; agreement is with the "
        f"Trojaned model's own answers (1.0 = unchanged); seconds: each mitigate run's wall time. "
        f"Total {time.time() - start:.0f} s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
