"""Command line of ``entrypoint.py``: ``configure``, ``mitigate`` and ``test``.

Flags follow the NIST harness (``--model`` with its alias ``--model_filepath``,
``--batch_size`` given as a string, absolute paths). Flags this version does not know are
dropped with a warning rather than failing the run, because the harness may add some.
Errors the user can fix print one line and exit non-zero (2 for bad metaparameters).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

from jsonargparse import ActionYesNo, ArgumentParser

from telelora import metaparameters, modelio, texts
from telelora.errors import TeleLoRAError
from telelora.io_utils import atomic_write_text

log = logging.getLogger("telelora")
DEFAULT_LEARNED = str(metaparameters.REPO_ROOT / "learned_parameters")


def _common(parser: ArgumentParser) -> None:
    meta_default, schema_default = metaparameters.default_paths()
    parser.add_argument("--metaparameters_filepath", type=str, default=str(meta_default), help="metaparameters JSON")
    parser.add_argument("--schema_filepath", type=str, default=str(schema_default), help="its JSON schema")
    parser.add_argument(
        "--learned_parameters_dirpath",
        type=str,
        default=DEFAULT_LEARNED,
        help="folder of trained generators and shipped texts",
    )
    parser.add_argument("--scratch_dirpath", type=str, default="./scratch", help="scratch space for this run")


def build_parser() -> tuple[ArgumentParser, dict[str, ArgumentParser]]:
    parser = ArgumentParser(prog="entrypoint.py", description="TeleLoRA zero-shot Trojan mitigation for TrojAI.")
    subcommands = parser.add_subcommands(dest="mode")

    mitigate = ArgumentParser(description="Mitigate one model: generate adapters zero-shot and merge them.")
    mitigate.add_argument(
        "--model", "--model_filepath", dest="model", type=str, required=True, help="model folder (or a file inside it)"
    )
    mitigate.add_argument("--output_dirpath", type=str, required=True, help="where the mitigated model + tokenizer go")
    mitigate.add_argument("--batch_size", type=int, default=1, help="accepted for the NIST harness")
    mitigate.add_argument(
        "--round_training_dataset_dirpath",
        type=str,
        default=None,
        help="the training round's models (ground truth included): mitigate merges toward the mean of up to "
        "reference_count of its models of the input's model_architecture, clean ones first, then poisoned ones whose "
        "trigger the round declares (metaparameters reference_weight, reference_kinds); without one it runs the "
        "generators",
    )
    mitigate.add_argument(
        "--peft_dirpath", type=str, default=None, help="also export the merged change as a PEFT LoRA here"
    )
    mitigate.add_argument(
        "--trust_remote_code", action=ActionYesNo, default=False, help="allow model code from the folder"
    )
    mitigate.add_argument(
        "--fail_on_fallback",
        action=ActionYesNo,
        default=False,
        help="exit 3 when the unchanged model had to be saved (default: exit 0, loud log)",
    )
    _common(mitigate)

    configure = ArgumentParser(description="Meta-train the generators and write learned parameters.")
    configure.add_argument(
        "--configure_models_dirpath", type=str, default=None, help="a round's models/ folder (or the round folder)"
    )
    configure.add_argument(
        "--extra_model_dirpaths", type=list[str], default=[], help="more model folders (public LLMs)"
    )
    configure.add_argument(
        "--validation_models_dirpath",
        type=str,
        default=None,
        help="held-out models (a round's models/ folder, or the round folder) whose strict Fidelity at every "
        "checkpoint picks the generators that ship; never a test split",
    )
    configure.add_argument(
        "--resume", action=ActionYesNo, default=False, help="continue from the checkpoint in --scratch_dirpath"
    )
    configure.add_argument(
        "--checkpoint_interval", type=int, default=25, help="iterations between checkpoints (the most a crash loses)"
    )
    configure.add_argument(
        "--cpu_cache_gb",
        type=float,
        default=32.0,
        help="CPU memory per process for training LLMs waiting their turn; beyond it they are re-loaded from disk",
    )
    configure.add_argument(
        "--process_group_timeout_minutes",
        type=float,
        default=60.0,
        help="under torchrun, how long a rank waits for the others (raise it when each rank prepares many "
        "large models from a cold cache before the first iteration)",
    )
    _common(configure)

    test = ArgumentParser(description="Measure ASR, MMLU and agreement of a (mitigated) model.")
    test.add_argument("--model", "--model_filepath", dest="model", type=str, required=True)
    test.add_argument("--result_filepath", type=str, required=True, help="where results.json goes")
    test.add_argument(
        "--prompts_filepath",
        type=str,
        default=None,
        help="the round model's test-example-data/prompts.json (default: the one inside --model)",
    )
    test.add_argument("--num_samples", type=int, default=100, help="clean and triggered prompts used, each")
    test.add_argument("--mmlu_questions", type=int, default=300, help="MMLU questions (fixed, seeded subset)")
    test.add_argument("--batch_size", type=int, default=8)
    test.add_argument("--trust_remote_code", action=ActionYesNo, default=False)
    _common(test)

    subs = {"mitigate": mitigate, "configure": configure, "test": test}
    for name, sub in subs.items():
        subcommands.add_subcommand(name, sub, help=sub.description)
    return parser, subs


_NUMBER = re.compile(r"^-\d|^-\.\d")


def _is_flag(token: str) -> bool:
    return token.startswith("-") and not _NUMBER.match(token)


def drop_unknown_flags(argv: list[str], sub: ArgumentParser) -> list[str]:
    """Remove flags the sub-command does not define, with the values that follow them.

    Values are the tokens up to the next flag (negative numbers are values). Flags must be
    spelled in full: an abbreviation counts as unknown.
    """
    known = {s for action in sub._actions for s in action.option_strings}
    kept, i = [], 0
    while i < len(argv):
        token = argv[i]
        if _is_flag(token) and token.split("=", 1)[0] not in known:
            end = i + 1
            if "=" not in token:
                while end < len(argv) and not _is_flag(argv[end]):
                    end += 1
            log.warning("ignoring unknown flag %s", " ".join(argv[i:end]))
            i = end
            continue
        kept.append(token)
        i += 1
    return kept


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = build_parser()
    if argv and argv[0] in subs:
        argv = [argv[0]] + drop_unknown_flags(argv[1:], subs[argv[0]])
    args = parser.parse_args(argv)
    mode = args.mode
    opts = args[mode]
    try:
        meta = metaparameters.load(opts.metaparameters_filepath, opts.schema_filepath)
        if mode == "mitigate":
            return _mitigate(opts, meta)
        if mode == "configure":
            return _configure(opts, meta)
        return _test(opts, meta)
    except TeleLoRAError as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # always one line
        return err.exit_code


def _mitigate(opts, meta) -> int:
    from telelora import mitigate

    report = mitigate.run(
        opts.model,
        opts.output_dirpath,
        meta,
        opts.learned_parameters_dirpath,
        opts.trust_remote_code,
        opts.peft_dirpath,
        opts.round_training_dataset_dirpath,
    )
    if not report.mitigated:
        print(
            f"error: mitigation failed ({report.reason}); the UNCHANGED model was saved to {opts.output_dirpath}",
            file=sys.stderr,
        )
        return 3 if opts.fail_on_fallback else 0
    return 0


def _configure(opts, meta) -> int:
    from telelora import configure
    from telelora.distributed import World

    if opts.checkpoint_interval < 1 or opts.cpu_cache_gb < 0 or opts.process_group_timeout_minutes <= 0:
        raise TeleLoRAError(
            "--checkpoint_interval must be at least 1, --cpu_cache_gb at least 0 "
            "and --process_group_timeout_minutes positive"
        )
    out = Path(opts.learned_parameters_dirpath)
    modelio.check_output_dir(out)  # fail now, not after hours of training
    dirs = configure.list_model_dirs(opts.configure_models_dirpath, opts.extra_model_dirpaths)
    held_out = []
    if opts.validation_models_dirpath:
        held_out = configure.list_model_dirs(opts.validation_models_dirpath, None, "--validation_models_dirpath")
    shared = {d.resolve() for d in held_out} & {d.resolve() for d in dirs}
    if shared:
        raise TeleLoRAError(f"validation models are also training models: {sorted(d.name for d in shared)}")
    # the texts travel with the learned parameters; a new folder takes the shipped ones
    texts_dir = out if (out / texts.TEXTS_FILE).is_file() else Path(DEFAULT_LEARNED)
    world = World.from_env(opts.process_group_timeout_minutes)
    try:
        configure.configure(
            dirs,
            meta,
            texts_dir,
            out,
            opts.scratch_dirpath,
            resume=opts.resume,
            checkpoint_interval=opts.checkpoint_interval,
            cpu_cache_gb=opts.cpu_cache_gb,
            world=world,
            validation_dirs=held_out,
        )
    finally:
        world.close()
    return 0


def _test(opts, meta) -> int:
    from telelora.lab import evaluate

    model_dir = modelio.resolve_model_dir(opts.model)
    modelio.check_model_dir(model_dir)
    prompts_path = Path(opts.prompts_filepath or model_dir / "test-example-data" / "prompts.json")
    prompts = evaluate.load_prompts(prompts_path)
    if opts.num_samples < 1 or opts.mmlu_questions < 0 or opts.batch_size < 1:
        raise TeleLoRAError("--num_samples and --batch_size must be at least 1, --mmlu_questions at least 0")
    shipped = texts.load(opts.learned_parameters_dirpath).mmlu_rows
    mmlu_rows = evaluate.mmlu_subset(opts.mmlu_questions, shipped) if opts.mmlu_questions else []
    result_path = Path(opts.result_filepath)
    modelio.check_output_dir(result_path.parent)
    device, dtype = modelio.pick_device_dtype(meta.device, meta.dtype, model_dir)
    tokenizer = modelio.load_tokenizer(model_dir, opts.trust_remote_code)
    model = modelio.load_model(model_dir, device, dtype, opts.trust_remote_code)
    results = evaluate.evaluate(model, tokenizer, prompts, mmlu_rows, opts.num_samples, opts.batch_size)
    results.update(model=str(model_dir), prompts=str(prompts_path), dtype=str(dtype))
    atomic_write_text(result_path, json.dumps(results, indent=2))
    log.info(
        "asr %.3f  mmlu %.3f  agreement %.3f  -> %s", results["asr"], results["mmlu"], results["agreement"], result_path
    )
    return 0
