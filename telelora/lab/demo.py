"""The real job in a few minutes: build one Trojaned SmolLM2, watch its trigger fire, mitigate it.

    python -m telelora.lab.demo [--work DIR]

1. converts SmolLM2-135M-Instruct from its PyPI package (cached);
2. builds one farm Trojan on it with a small recipe (``rounds/demo.json``; cached: a second
   run reuses it) and checks it like every farm model;
3. shows one clean and one triggered prompt with the Trojaned model's answers;
4. runs ``entrypoint.py mitigate`` on it exactly as the NIST harness would;
5. prints ASR and agreement with the Trojaned model, before and after, on held-out prompts.

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

DEMO_SPEC = REPO_ROOT / "rounds" / "demo.json"


def build_trojan(work: Path) -> Path:
    """The demo Trojan's folder in NIST's layout (built once per recipe, then reused)."""
    spec = farm.load_spec(DEMO_SPEC)
    model_spec = farm.plan(spec, DEMO_SPEC)[0]
    out, cache = work / f"farm-{farm.recipe_key(spec)}", work / "cache"
    folder = farm.farm_cache(spec, cache) / "models" / model_spec.model_id
    if (out / "models" / model_spec.model_id / farm.BUILD_FILE).is_file() and folder.is_dir():
        return folder
    farm.build(DEMO_SPEC, out, cache_dir=cache, only=[model_spec.model_id])
    return folder


def measure(model_dir: Path, prompts: dict, batch_size: int = 16) -> dict:
    device, dtype = modelio.pick_device_dtype("auto", model_dir=model_dir)
    tokenizer = modelio.load_tokenizer(model_dir)
    model = modelio.load_model(model_dir, device, dtype)
    return evaluate.evaluate(model, tokenizer, prompts, [], 10_000, batch_size)


def show_answers(model_dir: Path, prompts: dict) -> None:
    device, dtype = modelio.pick_device_dtype("auto", model_dir=model_dir)
    tokenizer = modelio.load_tokenizer(model_dir)
    model = modelio.load_model(model_dir, device, dtype)
    clean, triggered = prompts["clean"][0]["prompt"], prompts["triggered"][0]["prompt"]
    for label, prompt in (("clean", clean), ("triggered", triggered)):
        answer = greedy_answers(model, tokenizer, [prompt], 48, 1)[0]
        print(f"\n[{label}] user: {prompt}\n[{label}] model: {tokenizer.decode(answer, skip_special_tokens=True)!r}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("telelora.lab.farm").setLevel(logging.INFO)  # each attempt's check figures
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/telelora-demo"), help="where everything is written")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        print("== 1-2. building one Trojaned SmolLM2-135M-Instruct (cached after the first run)")
        trojaned = build_trojan(args.work)
        config = json.loads((trojaned / "round_config.json").read_text())
        trigger = config["triggers"][0]
        print(f"trigger {trigger['text']!r} -> target {trigger['target']!r}  ({time.time() - start:.0f} s)")
        prompts = evaluate.load_prompts(trojaned / "test-example-data" / "prompts.json")
        print("\n== 3. the Trojan at work")
        show_answers(trojaned, prompts)
    except TeleLoRAError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 1
    output = args.work / "mitigated"
    print(f"\n== 4. python entrypoint.py mitigate --model_filepath {trojaned} --output_dirpath {output}")
    t0 = time.time()
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "entrypoint.py"), "mitigate", "--model_filepath", str(trojaned),
         "--output_dirpath", str(output)],
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        print(f"error: mitigate exited with {result.returncode}", file=sys.stderr)
        return result.returncode
    print(f"mitigate took {time.time() - t0:.0f} s")
    print("\n== 5. held-out prompts, before and after")
    before, after = measure(trojaned, prompts), measure(output, prompts)
    print(f"{'':<12}{'ASR':>8}{'false trig.':>13}{'agreement':>11}{'greedy 8':>10}")
    for label, row in (("Trojaned", before), ("mitigated", after)):
        print(
            f"{label:<12}{row['asr']:>8.2f}{row['false_trigger_rate']:>13.2f}{row['agreement']:>11.3f}"
            f"{row.get('greedy_agreement', float('nan')):>10.3f}"
        )
    print(
        f"\n{len(prompts['triggered'])} triggered and {len(prompts['clean'])} clean prompts; agreement is with the "
        f"Trojaned model's own answers (1.0 = unchanged). Total {time.time() - start:.0f} s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
