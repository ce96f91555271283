import os
import stat

from telelora.io_utils import atomic_write_text, publish_dir, staging_dir


def test_atomic_write_replaces_and_is_world_readable(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]


def test_publish_creates_then_replaces_a_folder(tmp_path):
    final = tmp_path / "out"
    first = staging_dir(final)
    (first / "a").write_text("1")
    publish_dir(first, final)
    second = staging_dir(final)
    (second / "b").write_text("2")
    os.chmod(second / "b", 0o600)
    publish_dir(second, final)
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert stat.S_IMODE((final / "b").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or backup left behind
