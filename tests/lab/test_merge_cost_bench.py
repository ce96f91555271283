"""The merge-cost bench: the whole merge route timed both ways, its checkpoint reads counted,
and the repair's cost reported as the --repair choice asks (gate held open, or left out)."""

import dataclasses

import pytest
import torch

from bench import merge_cost as bench
from telelora import metaparameters
from telelora.lab import tiny
from telelora.texts import load as load_texts
from tests.conftest import REPO, write_meta


@pytest.mark.parametrize("repair", ["always", "off"])
def test_a_row_times_the_route_and_its_repair(tmp_path, poisoned_round, learned_dir, repair):
    meta = metaparameters.load(
        write_meta(tmp_path / "meta.json", reference_weight=0.02, repair_prompts=8, repair_max_agreement=0.0),
        REPO / "metaparameters_schema.json",
    )
    meta = dataclasses.replace(meta, **bench.REPAIR[repair])
    models = poisoned_round / "models"
    row = bench.bench_mode(
        "memory", models / "id-1", models / "id-2", tmp_path / "out", meta, load_texts(learned_dir),
        tiny.build_tokenizer(), torch.device("cpu"), torch.float32,
    )  # fmt: skip
    assert (tmp_path / "out" / "config.json").exists()
    # the load, one read of the reference (tensor bytes: the file's header is not counted), the write's copy
    assert row["in_memory"] and row["checkpoint_passes_read"] == pytest.approx(3.0, abs=0.05)
    assert row["weights"] == [0.02] and row["trigger_tries"] == 1  # the declared trigger does not fire
    if repair == "always":  # the shipped gate at 0.0 would stay shut: "always" opens it
        assert 0 < row["repair_examples"] <= 8 and row["repair_steps"] == -(-row["repair_examples"] // 2)
        assert row["repair_s"] > 0
        assert row["gate_reading"] is None and row["repair_skipped"] == ""  # an open gate, the guard off: not read
        assert row["repair_s"] <= row["checks_s"]
    else:
        assert row["repair_s"] == 0.0 and row["repair_steps"] == 0 and row["repair_skipped"] == "off"
