import json

import pytest

from telelora import metaparameters
from telelora.errors import MetaparameterError

from .conftest import REPO, SMALL_META, write_meta

SCHEMA = REPO / "metaparameters_schema.json"


def test_shipped_metaparameters_validate():
    meta = metaparameters.load()
    assert meta.rank <= meta.num_reference_texts
    assert set(meta.to_dict()) == set(json.loads(SCHEMA.read_text())["properties"])


def test_schema_has_the_nist_header_and_bounds():
    schema = json.loads(SCHEMA.read_text())
    for key in (
        "title",
        "technique",
        "technique_description",
        "technique_changes",
        "technique_type",
        "commit_id",
        "repo_name",
    ):
        assert key in schema
    assert schema["$schema"].startswith("http://json-schema.org/draft-07")
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == set(schema["properties"])
    for name, prop in schema["properties"].items():
        if prop["type"] in ("integer", "number"):
            for bound in ("minimum", "maximum", "suggested_minimum", "suggested_maximum"):
                assert bound in prop, f"{name} lacks {bound}"
            assert prop["minimum"] <= prop["suggested_minimum"] <= prop["suggested_maximum"] <= prop["maximum"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"rank": 0}, r"key 'rank' has value 0; allowed range \[1, 512\]"),
        ({"step_size": 5.0}, r"key 'step_size' has value 5.0; allowed range \[0.0, 2.0\]"),
        ({"activation_tokens": "first"}, r"key 'activation_tokens' has value 'first'; allowed values"),
        ({"target_projections": ["q", "lm_head"]}, r"key 'target_projections.1' has value 'lm_head'"),
        ({"seed": "7"}, r"key 'seed' has value '7'"),
        ({"bogus": 1}, r"'bogus' was unexpected.*remove the key"),
        ({"rank": 17, "num_reference_texts": 16}, r"'rank' has value 17; it must be at most num_reference_texts"),
    ],
)
def test_bad_values_name_key_value_and_range(tmp_path, override, expected):
    path = write_meta(tmp_path / "m.json", **override)
    with pytest.raises(MetaparameterError, match=expected) as info:
        metaparameters.load(path, SCHEMA)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)


def test_missing_key_and_unreadable_files(tmp_path):
    values = dict(SMALL_META)
    del values["rank"]
    (tmp_path / "m.json").write_text(json.dumps(values))
    with pytest.raises(MetaparameterError, match="'rank' is a required property"):
        metaparameters.load(tmp_path / "m.json", SCHEMA)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MetaparameterError, match="is not valid JSON"):
        metaparameters.load(tmp_path / "bad.json", SCHEMA)
    with pytest.raises(MetaparameterError, match="does not exist"):
        metaparameters.load(tmp_path / "absent.json", SCHEMA)


def test_a_broken_schema_gets_one_line(tmp_path):
    (tmp_path / "schema.json").write_text('{"type": "objekt"}')
    with pytest.raises(MetaparameterError, match="not a valid draft-07 schema"):
        metaparameters.load(write_meta(tmp_path / "m.json"), tmp_path / "schema.json")


def test_keys_that_do_nothing_while_their_switch_is_off_are_left_out_of_comparisons():
    from telelora.metaparameters import effective

    off = {"repair_prompts": 0, "repair_learning_rate": 0.001, "repair_batch_size": 8, "repair_max_agreement": 1.0,
           "rank": 16}  # fmt: skip
    assert (
        effective(off)
        == effective({**off, "repair_learning_rate": 0.1, "repair_batch_size": 2, "repair_max_agreement": 0.9})
        == {"repair_prompts": 0, "rank": 16}
    )
    on = {**off, "repair_prompts": 256}
    assert effective(on) == on and effective(on) != effective({**on, "repair_learning_rate": 0.1})
    assert effective({"rank": 16, "repair_learning_rate": 0.1}) == {"rank": 16}  # a run from before the switch existed
