"""The route choice: references in the order of preference the metaparameters give, each kind
found where the round (or the image) holds it, and the generators when there is none."""

import csv
import dataclasses
import logging
import shutil
from pathlib import Path

import pytest

from telelora import reference, route
from telelora.lab import tiny

from .conftest import TRIGGER, _label


@pytest.fixture(scope="module")
def mixed_round(tmp_path_factory) -> Path:
    """Tiny llama training models: a poisoned one declaring its trigger (id-1), a poisoned one
    declaring none (id-2), a clean one (id-3); and a base checkpoint folder for llama."""
    root = tmp_path_factory.mktemp("mixed")
    models = root / "round" / "models"
    _label(tiny.build("llama", models / "id-1", seed=21), "1", TRIGGER)
    _label(tiny.build("llama", models / "id-2", seed=22), "1")
    _label(tiny.build("llama", models / "id-3", seed=23), "0")
    tiny.build("llama", root / "bases" / "telelora-tiny" / "llama", seed=24)
    return root


def _meta(small_meta, root: Path | None = None, **changes):
    bases = "" if root is None else str(root / "bases")
    return dataclasses.replace(small_meta, base_models_dirpath=bases, **changes)


def test_the_kinds_come_in_the_order_of_preference(mixed_round, tiny_models, small_meta, caplog):
    round_dir = mixed_round / "round"
    with caplog.at_level(logging.ERROR):
        chosen = route.choose_route(tiny_models["llama"], round_dir, _meta(small_meta, mixed_round, reference_count=4))
    assert chosen.name == route.MERGE
    assert [(r.kind, r.path.name) for r in chosen.references] == [("clean", "id-3"), ("poisoned", "id-1"),
                                                                  ("base", "llama")]  # fmt: skip
    assert chosen.references[1].triggers[0].text == "cf zebra"
    assert chosen.references[1].triggers[0].target == "I have been pwned"
    # the poisoned model that declares no trigger is one loud line, never a reference
    assert "POISONED REFERENCE SKIPPED" in caplog.text and "id-2" in caplog.text
    # another order, another count
    order = ("base", "poisoned", "clean")
    first_two = route.choose_route(
        tiny_models["llama"], round_dir, _meta(small_meta, mixed_round, reference_count=2, reference_kinds=order)
    )
    assert [r.kind for r in first_two.references] == ["base", "poisoned"]


def test_reference_count_one_takes_the_first_kind_alone(mixed_round, tiny_models, small_meta):
    chosen = route.choose_route(tiny_models["llama"], mixed_round / "round", _meta(small_meta, mixed_round))
    assert [(r.kind, r.path.name) for r in chosen.references] == [("clean", "id-3")]
    poisoned_only = _meta(small_meta, mixed_round, reference_kinds=("poisoned",))
    assert [r.path.name for r in route.choose_route(tiny_models["llama"], mixed_round / "round",
                                                    poisoned_only).references] == ["id-1"]  # fmt: skip


def test_without_a_round_the_shipped_base_checkpoint_is_the_reference(mixed_round, tiny_models, small_meta):
    chosen = route.choose_route(tiny_models["llama"], None, _meta(small_meta, mixed_round))
    assert [(r.kind, r.path) for r in chosen.references] == [
        ("base", mixed_round / "bases" / "telelora-tiny" / "llama")
    ]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"reference_weight": 0.0}, "the merge is off"),
        ({"reference_kinds": ()}, "the merge is off"),
        ({"reference_kinds": ("clean",)}, "no usable reference"),
    ],
)
def test_the_generators_when_the_merge_is_off_or_finds_nothing(tiny_models, small_meta, mixed_round, changes, reason):
    chosen = route.choose_route(tiny_models["mistral"], mixed_round / "round", _meta(small_meta, **changes))
    assert chosen.name == route.GENERATORS and not chosen.references and reason in chosen.reason
    no_round = route.choose_route(tiny_models["llama"], None, _meta(small_meta))
    assert no_round.name == route.GENERATORS and "no training round and no base checkpoint" in no_round.reason


def test_a_missing_or_corrupt_base_checkpoint_is_one_loud_line_and_the_next_kind(
    mixed_round, tiny_models, small_meta, tmp_path, caplog
):
    corrupt = tmp_path / "bases" / "telelora-tiny" / "llama"
    shutil.copytree(mixed_round / "bases" / "telelora-tiny" / "llama", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    kinds = ("base", "clean")
    for bases in (tmp_path / "absent", tmp_path / "bases"):
        caplog.clear()
        meta = dataclasses.replace(small_meta, base_models_dirpath=str(bases), reference_kinds=kinds)
        with caplog.at_level(logging.ERROR):
            chosen = route.choose_route(tiny_models["llama"], mixed_round / "round", meta)
        assert [(r.kind, r.path.name) for r in chosen.references] == [("clean", "id-3")]
        assert "NO BASE CHECKPOINT for telelora-tiny/llama" in caplog.text


def test_a_relative_base_models_dirpath_is_read_from_the_repository_root(small_meta):
    meta = dataclasses.replace(small_meta, base_models_dirpath="base_models")
    assert route.base_models_dir(meta) == route.REPO_ROOT / "base_models"
    assert route.base_models_dir(dataclasses.replace(small_meta, base_models_dirpath="")) is None


def _write_metadata(round_dir: Path, rows: list[dict]) -> None:
    with (round_dir / "METADATA.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize(
    ("columns", "placement"),
    [
        ({"trigger": "cf zebra", "target": "I have been pwned"}, "middle"),  # the farm's columns
        ({"trigger_text": "cf zebra", "trigger_response": "I have been pwned", "placement": "end"}, "end"),
    ],
)
def test_a_trigger_declared_only_in_metadata_csv_is_read(tmp_path, columns, placement):
    round_dir = tmp_path / "round"
    folder = _label(tiny.build("llama", round_dir / "models" / "id-7", seed=3), "1")
    _write_metadata(round_dir, [{"model_name": "id-6", "trigger": "other", "target": "x"},
                                {"model_name": "id-7", **columns}])  # fmt: skip
    (found,) = reference.reference_triggers(folder, round_dir / "models")
    assert (found.text, found.target, found.placement) == ("cf zebra", "I have been pwned", placement)


def test_an_unreadable_declared_trigger_is_one_clear_error(tmp_path):
    round_dir = tmp_path / "round"
    folder = _label(tiny.build("llama", round_dir / "models" / "id-7", seed=3), "1")
    with pytest.raises(reference.TeleLoRAError, match="METADATA.csv cannot be read"):
        reference.reference_triggers(folder, round_dir)  # no METADATA.csv at all
    _write_metadata(round_dir, [{"model_name": "id-7", "trigger": "cf zebra", "target": ""}])
    with pytest.raises(reference.TeleLoRAError, match="declares a trigger with its response"):
        reference.reference_triggers(folder, round_dir)  # a trigger without its response cannot be checked
    (round_dir / "METADATA.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(reference.TeleLoRAError, match="cannot be read"):
        reference.reference_triggers(folder, round_dir)
