"""The merge toward clean reference models: which models are chosen, the exact merged weights
toward one or the mean of several (in the written checkpoint and in memory), the fallback to
the generators, bad input."""

import collections
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from telelora import cli, mitigate, modelio, reference
from telelora.lab import tiny
from telelora.lab.reads import Reads, counting_open

from .conftest import write_meta
from .test_mitigate import _digest, _nist_args


def _label(folder: Path, truth: str | None) -> Path:
    if truth is not None:
        (folder / "ground_truth.csv").write_text(truth + "\n")
    return folder


def _claim(folder: Path, architecture: str) -> Path:
    """Say in ``round_config.json`` that the folder is a fine-tune of ``architecture``."""
    config = json.loads((folder / "round_config.json").read_text())
    (folder / "round_config.json").write_text(json.dumps({**config, "model_architecture": architecture}))
    return folder


@pytest.fixture(scope="module")
def training_round(tmp_path_factory) -> Path:
    """A training round for tiny llama inputs. Sorted by name: a poisoned llama, an unlabelled
    llama, a llama whose label is neither 0 nor 1, a clean qwen2 claiming to be llama (other
    tensors), a clean mistral, then the one clean llama (``id-5``) and a second clean llama
    (``id-6``) that comes after it."""
    models = tmp_path_factory.mktemp("training-round") / "models"
    _label(tiny.build("llama", models / "id-1", seed=11), "1")
    _label(tiny.build("llama", models / "id-2", seed=12), None)
    _label(tiny.build("llama", models / "id-2b", seed=12), "clean")  # not a label: never a reference
    _label(_claim(tiny.build("qwen2", models / "id-3", seed=13), "telelora-tiny/llama"), "0")
    _label(tiny.build("mistral", models / "id-4", seed=14), "0")
    _label(tiny.build("llama", models / "id-5", seed=15), "0")
    _label(tiny.build("llama", models / "id-6", seed=16), "0")
    return models.parent


def _paths(found: list[reference.Reference]) -> list[Path]:
    assert all(r.kind == "clean" for r in found)
    return [r.path for r in found]


def test_interpolate_is_the_weighted_mean_in_float32():
    w, ref = torch.randn(4, 3).bfloat16(), torch.randn(4, 3)
    assert torch.equal(reference.interpolate(w, ref, 0.0), w.float())
    assert torch.equal(reference.interpolate(w, ref, 1.0), ref)
    assert torch.allclose(reference.interpolate(w, ref, 0.25), 0.75 * w.float() + 0.25 * ref)
    assert reference.interpolate(w, ref, 0.5).dtype == torch.float32


def test_the_first_clean_model_of_the_same_architecture_and_tensors_is_chosen(training_round, tiny_models, caplog):
    with caplog.at_level(logging.WARNING):
        chosen = _paths(reference.find_references(training_round, tiny_models["llama"], 1))
    assert chosen == [training_round / "models" / "id-5"]
    assert "id-3 differs in" in caplog.text  # the qwen2 claiming to be llama
    # the round's models/ folder itself works too
    assert _paths(reference.find_references(training_round / "models", tiny_models["llama"], 1)) == chosen


def test_reference_count_takes_the_first_clean_matches_in_folder_order(training_round, tiny_models):
    models = training_round / "models"
    two = [models / "id-5", models / "id-6"]
    assert _paths(reference.find_references(training_round, tiny_models["llama"], 2)) == two
    # asking for more than the round has gives what it has
    assert _paths(reference.find_references(training_round, tiny_models["llama"], 16)) == two
    with pytest.raises(ValueError, match="at least 1"):
        reference.find_references(training_round, tiny_models["llama"], 0)


def test_the_input_itself_is_never_its_own_reference(training_round):
    own = training_round / "models" / "id-5"
    assert _paths(reference.find_references(training_round, own, 4)) == [training_round / "models" / "id-6"]


def test_no_reference_without_a_clean_model_of_the_architecture(training_round, tiny_models, caplog):
    with caplog.at_level(logging.WARNING):
        assert reference.find_references(training_round, tiny_models["phi3"], 1) == []
    assert "no reference of kinds ['clean'] for telelora-tiny/phi3" in caplog.text


def test_an_input_without_architecture_gets_no_reference(training_round, tiny_models, tmp_path, caplog):
    folder = Path(shutil.copytree(tiny_models["llama"], tmp_path / "anonymous"))
    for name in ("round_config.json", "reduced-config.json"):
        (folder / name).unlink()
    with caplog.at_level(logging.WARNING):
        assert reference.find_references(training_round, folder, 1) == []
    assert "names no model_architecture" in caplog.text


def test_an_unreadable_candidate_is_skipped(tiny_models, tmp_path, caplog):
    models = tmp_path / "round" / "models"
    broken = _label(Path(shutil.copytree(tiny_models["llama"], models / "id-1")), "0")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    good = _label(Path(shutil.copytree(tiny_models["llama"], models / "id-2")), "0")
    with caplog.at_level(logging.WARNING):
        assert reference.find_references(models.parent, tiny_models["mistral"], 1) == []
        assert _paths(reference.find_references(models.parent, tiny_models["llama"], 2)) == [good]
    assert "id-1 is unreadable" in caplog.text


def test_a_missing_round_folder_is_one_loud_line_and_no_reference(tiny_models, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert reference.find_references(tmp_path / "nowhere", tiny_models["llama"], 1) == []
    assert "NO REFERENCE MODEL FROM THE ROUND" in caplog.text and "is not a folder" in caplog.text


@pytest.mark.parametrize(("weight", "count"), [(0.5, 1), (0.25, 1), (0.5, 2)])
def test_mitigate_writes_the_merge_toward_the_references_mean(
    tmp_path, model_copy, learned_dir, training_round, weight, count
):
    model_dir = model_copy("llama")
    before = _digest(model_dir)
    meta = write_meta(tmp_path / "meta.json", reference_weight=weight, reference_count=count)
    output = model_dir / "output"
    argv = _nist_args(model_dir, output, meta, learned_dir, tmp_path, "--round_training_dataset_dirpath",
                      str(training_round))  # fmt: skip
    assert cli.main(argv) == 0
    assert _digest(model_dir) == before
    report = json.loads((output / mitigate.REPORT_FILE).read_text())
    assert report["mitigated"] and report["method"] == "reference_merge"
    assert set(report["seconds"]) == {"copy_input", "merge_checks", "merge_and_save"}  # no model built
    assert report["reference_kinds"] == ["clean"] * count and report["reference_weights"] == [weight / count] * count
    chosen = [training_round / "models" / name for name in ("id-5", "id-6")[:count]]
    assert report["reference_models"] == [str(d) for d in chosen] and report["reference_weight"] == weight

    mine = load_file(str(model_dir / "model.safetensors"))
    theirs = [load_file(str(d / "model.safetensors")) for d in chosen]
    merged = load_file(str(output / "model.safetensors"))
    assert merged.keys() == mine.keys()
    for key, value in mine.items():
        mean = sum(t[key].float() for t in theirs) / count
        expected = ((1 - weight) * value.float() + weight * mean).to(value.dtype)
        assert torch.allclose(merged[key], expected, atol=1e-6), key
        if count > 1 and not torch.equal(theirs[0][key], theirs[1][key]):  # the mean, not the first alone
            assert not torch.allclose(merged[key], ((1 - weight) * value + weight * theirs[0][key]), atol=1e-6), key
    AutoModelForCausalLM.from_pretrained(output)
    AutoTokenizer.from_pretrained(output)


def test_in_memory_merge_equals_the_written_one(tmp_path, model_copy, learned_dir, training_round):
    model_dir = model_copy("llama")
    output = tmp_path / "output"
    argv = _nist_args(model_dir, output, write_meta(tmp_path / "meta.json", reference_count=2), learned_dir,
                      tmp_path, "--round_training_dataset_dirpath", str(training_round))  # fmt: skip
    assert cli.main(argv) == 0
    model = modelio.load_model(model_dir, torch.device("cpu"), torch.float32)
    models = training_round / "models"
    count = reference.merge_into(model, model_dir, [models / "id-5", models / "id-6"], 0.5)
    written = modelio.load_model(output, torch.device("cpu"), torch.float32)
    assert count == len(list(model.parameters()))
    for (name, a), (_, b) in zip(model.named_parameters(), written.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("count", [1, 2])
def test_round_like_bf16_shards_merge_shard_by_shard(tmp_path, learned_dir, count):
    """Sharded bf16 checkpoints with an index, as the round's: every shard is rewritten in
    its own name and dtype, the index copied; the mean of bf16 references is taken in float32."""
    inputs = tmp_path / "in"
    model_dir = tiny.build_round_like("gemma2", inputs / "trojan", seed=1)
    clean = [
        _label(tiny.build_round_like("gemma2", tmp_path / "round" / "models" / f"id-{9 + i}", seed=2 + i), "0")
        for i in range(count)
    ]
    output = tmp_path / "output"
    argv = _nist_args(model_dir, output, write_meta(tmp_path / "meta.json", reference_count=count), learned_dir,
                      tmp_path, "--round_training_dataset_dirpath", str(tmp_path / "round"))  # fmt: skip
    assert cli.main(argv) == 0
    assert (output / "model.safetensors.index.json").read_bytes() == (
        model_dir / "model.safetensors.index.json"
    ).read_bytes()
    for shard in modelio.weight_files(model_dir):
        mine, merged = (load_file(str(d / shard.name)) for d in (model_dir, output))
        theirs = [load_file(str(d / shard.name)) for d in clean]
        for key, value in mine.items():
            assert merged[key].dtype == value.dtype == torch.bfloat16
            mean = sum(t[key].float() for t in theirs) / count
            expected = (0.5 * value.float() + 0.5 * mean).bfloat16()
            assert torch.equal(merged[key], expected), key


def test_the_references_mean_is_read_afresh_every_time(training_round):
    """float32 tensors may be views of the files' memory maps: the mean must not write into them."""
    models = training_round / "models"
    stored = [load_file(str(models / name / "model.safetensors")) for name in ("id-5", "id-6")]
    with reference.open_references([models / "id-5", models / "id-6"]) as tensor:
        for key in stored[0]:
            first, again = tensor(key), tensor(key)
            assert torch.equal(first, again), key
            assert torch.allclose(first, (stored[0][key] + stored[1][key]) / 2), key
    with reference.open_references([models / "id-5"]) as tensor:
        assert all(torch.equal(tensor(key), value) for key, value in stored[0].items())
    with pytest.raises(ValueError, match="at least one"):
        with reference.open_references([]):
            pass


def test_reference_weight_zero_runs_the_generators(tmp_path, model_copy, learned_dir, training_round):
    model_dir = model_copy("llama")
    argv = _nist_args(model_dir, tmp_path / "out", write_meta(tmp_path / "meta.json", reference_weight=0.0),
                      learned_dir, tmp_path, "--round_training_dataset_dirpath", str(training_round))  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "out" / mitigate.REPORT_FILE).read_text())
    assert report["mitigated"] and report["method"] == "generators" and report["reference_models"] == []


def test_no_reference_in_the_round_falls_back_to_the_generators(tmp_path, model_copy, learned_dir, training_round):
    model_dir = model_copy("phi3")
    argv = _nist_args(model_dir, tmp_path / "out", write_meta(tmp_path / "meta.json"), learned_dir, tmp_path,
                      "--round_training_dataset_dirpath", str(training_round))  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "out" / mitigate.REPORT_FILE).read_text())
    assert report["mitigated"] and report["method"] == "generators" and report["num_layers_adapted"] > 0


def test_peft_export_with_a_reference_is_refused_before_writing(tmp_path, model_copy, learned_dir, training_round,
                                                                 capsys):  # fmt: skip
    model_dir = model_copy("llama")
    argv = _nist_args(model_dir, tmp_path / "out", write_meta(tmp_path / "meta.json"), learned_dir, tmp_path,
                      "--round_training_dataset_dirpath", str(training_round), "--peft_dirpath",
                      str(tmp_path / "peft"))  # fmt: skip
    assert cli.main(argv) != 0
    assert "changes every weight in full" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "peft").exists()


def test_an_unusable_round_folder_falls_back_to_the_generators(tmp_path, model_copy, learned_dir, capsys):
    """The harness's round path is not ours to fix: a bad one costs the merge, never the output."""
    model_dir = model_copy("llama")
    argv = _nist_args(model_dir, tmp_path / "out", write_meta(tmp_path / "meta.json"), learned_dir, tmp_path,
                      "--round_training_dataset_dirpath", str(tmp_path / "nowhere"))  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().err
    assert "NO REFERENCE MODEL" in printed and "is not a folder" in printed
    report = json.loads((tmp_path / "out" / mitigate.REPORT_FILE).read_text())
    assert report["mitigated"] and report["method"] == "generators"


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _count_reads(monkeypatch) -> collections.Counter:
    """Tensors read through ``reference``'s safetensors files, by model folder."""
    reads = Reads()
    monkeypatch.setattr(reference, "safe_open", counting_open(reads))
    return reads.tensors


def test_merged_tensors_picks_the_blocks_from_a_relative_depth_on(caplog):
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{i}.{part}.weight" for i in range(5) for part in ("mlp.down_proj", "input_layernorm")
    ]
    assert reference.merged_tensors(names, 0.0) == set(names)
    upper = reference.merged_tensors(names, 0.5)  # depths 0, .25, .5, .75, 1
    assert upper == {n for n in names if any(f"layers.{i}." in n for i in (2, 3, 4))}
    assert reference.merged_tensors(names, 1.0) == {n for n in names if "layers.4." in n}
    nested = [f"language_model.model.layers.{i}.mlp.up_proj.weight" for i in range(3)]  # a multimodal layout
    assert reference.merged_tensors(nested, 0.6) == {nested[2]}
    with caplog.at_level(logging.WARNING):
        assert reference.merged_tensors(["wte.weight", "h0.attn.weight"], 0.5) == {"wte.weight", "h0.attn.weight"}
    assert "MERGE DEPTH" in caplog.text


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_merge_from_a_depth_changes_only_those_blocks_in_every_path(training_round, tiny_models, tmp_path,
                                                                      monkeypatch, in_memory):  # fmt: skip
    """The trial (in RAM or from disk), the in-place merge and the written checkpoint agree,
    and every tensor outside the picked blocks stays the input's bit for bit."""
    model_dir = tiny_models["llama"]
    refs = [training_round / "models" / "id-5", training_round / "models" / "id-6"]
    weights = [0.25, 0.25]
    input_weights = _weights(modelio.load_model(model_dir, torch.device("cpu"), torch.float32))
    model = modelio.load_model(model_dir, torch.device("cpu"), torch.float32)
    count = reference.merge_into(model, model_dir, refs, sum(weights), weights, from_depth=0.5)
    expected = _weights(model)
    picked = reference.merged_tensors(reference.floating_shapes(model_dir), 0.5)
    assert 0 < count < len(input_weights) and count == len([n for n in picked if n in input_weights])
    changed = {n for n, value in expected.items() if not torch.equal(value, input_weights[n])}
    assert changed and changed <= picked  # (a picked norm may equal its references': all ones in tiny models)
    if not in_memory:
        monkeypatch.setattr(reference, "available_memory", lambda: 0)
    model = modelio.load_model(model_dir, torch.device("cpu"), torch.float32)
    record = reference.MergeTrial()
    with reference.merge_trial(model, model_dir, refs, record, from_depth=0.5) as merged:
        with merged(weights):
            seen = _weights(model)
    assert all(torch.allclose(seen[n], expected[n], atol=1e-6) for n in expected)
    assert all(torch.equal(v, input_weights[n]) for n, v in _weights(model).items())
    if in_memory:
        per_copy = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in picked)
        assert record.bytes_held == 3 * per_copy  # only the picked blocks are held
    output = tmp_path / "out"
    with reference.open_references(refs, weights) as tensor:
        modelio.save_mitigated(model_dir, output, reference.merge_changes(model_dir, tensor, sum(weights), 0.5))
    written = _weights(modelio.load_model(output, torch.device("cpu"), torch.float32))
    assert all(torch.allclose(written[n], expected[n], atol=1e-6) for n in expected)
    assert all(torch.equal(written[n], input_weights[n]) for n in expected if n not in picked)


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_merge_trial_computes_each_merge_and_puts_the_input_back_exactly(
    training_round, tiny_models, monkeypatch, in_memory
):
    """Per-reference weights, tried one after another as the merge route's checks do: each is
    the written merge's arithmetic (``merge_into``), the input comes back bit for bit after
    each; in RAM each reference is read once, from disk once per try (too little free RAM)."""
    model_dir = tiny_models["llama"]
    refs = [training_round / "models" / "id-5", training_round / "models" / "id-6"]
    tries = [[0.25, 0.25], [0.125, 0.25], [0.0, 0.1], [0.0, 0.0]]
    expected = []
    for weights in tries:
        model = modelio.load_model(model_dir, torch.device("cpu"), torch.float32)
        if sum(weights) > 0:
            reference.merge_into(model, model_dir, refs, sum(weights), weights)
        expected.append(_weights(model))
    if not in_memory:
        monkeypatch.setattr(reference, "available_memory", lambda: 0)
    model = modelio.load_model(model_dir, torch.device("cpu"), torch.float32)
    own = _weights(model)
    record = reference.MergeTrial()
    merged_count = len(reference._merged_params(model, model_dir, 0.0))
    reads = _count_reads(monkeypatch)
    with reference.merge_trial(model, model_dir, refs, record) as merged:
        for weights, wanted in zip(tries, expected, strict=True):
            with merged(weights):
                seen = _weights(model)
            for name, value in _weights(model).items():
                assert torch.equal(value, own[name]), name
                assert torch.allclose(seen[name], wanted[name], atol=1e-6), (weights, name)
    assert record.in_memory == in_memory and record.held_on == ("cpu" if in_memory else "disk")
    assert record.tries == len(tries)
    assert record.bytes_held == 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    if in_memory:  # one read per reference, whatever the number of tries
        assert reads == {r: merged_count for r in refs}
    else:  # each try that moves the model reads its references with a weight, and its restore the input
        assert reads == {refs[0]: 2 * merged_count, refs[1]: 3 * merged_count, model_dir: 3 * merged_count}


@pytest.mark.parametrize("from_depth", [0.0, 0.5])
def test_the_write_takes_the_references_the_trial_held_and_writes_the_same_bytes(
    training_round, tiny_models, tmp_path, monkeypatch, from_depth
):
    """The merge route reads each reference once: the trial keeps what it read (in the stored
    dtype), and the write takes it from there, bit for bit what reading the files again gives."""
    model_dir = tiny_models["llama"]
    refs = [training_round / "models" / "id-5", training_round / "models" / "id-6"]
    weights = [0.3, 0.15]
    model = modelio.load_model(model_dir, torch.device("cpu"), torch.float32)
    held: reference.HeldReferences = {}
    with reference.merge_trial(model, model_dir, refs, from_depth=from_depth, keep=held) as merged:
        with merged(weights):
            pass
    names = set(reference.merge_changes(model_dir, lambda n: None, 0.5, from_depth))
    assert set(held) == set(refs) and all(set(h) == names for h in held.values())
    for folder, tensors in held.items():  # as stored: a bfloat16 checkpoint is held in bfloat16
        stored = modelio.tensor_headers(folder)
        assert all(t.dtype == modelio.SAFETENSORS_FLOATS[stored[n][0]] for n, t in tensors.items())
    outputs = {}
    for source in ("disk", "memory"):
        reads = _count_reads(monkeypatch)
        outputs[source] = tmp_path / source
        with reference.open_references(refs, weights, held if source == "memory" else None) as tensor:
            changes = reference.merge_changes(model_dir, tensor, sum(weights), from_depth)
            modelio.save_mitigated(model_dir, outputs[source], changes)
        assert reads == ({} if source == "memory" else {r: len(names) for r in refs})
    written = [(outputs[s] / "model.safetensors").read_bytes() for s in ("disk", "memory")]
    assert written[0] == written[1]


def test_available_memory_reads_a_positive_figure():
    assert reference.available_memory() > 0


@pytest.mark.parametrize(
    ("device", "gpu_free", "ram_free", "expected"),
    [
        ("cuda", 100 * 2**30, 0, "cuda"),  # fits on the accelerator beside the headroom: no transfer per try
        ("cuda", 11 * 2**30, 100 * 2**30, "cpu"),  # not with the headroom: RAM
        ("cuda", 0, 19 * 2**30, None),  # neither: more than half the free RAM, the disk fallback
        ("cpu", 0, 20 * 2**30, "cpu"),
        ("cpu", 0, 19 * 2**30, None),
    ],
)
def test_the_trial_is_held_on_the_accelerator_then_in_ram_then_read_from_disk(
    monkeypatch, device, gpu_free, ram_free, expected
):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _: (gpu_free, 80 * 2**30))
    monkeypatch.setattr(reference, "available_memory", lambda: ram_free)
    store = reference.trial_store(torch.device(device), 10 * 2**30)
    assert (store if store is None else store.type) == expected
