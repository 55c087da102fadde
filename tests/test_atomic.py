from pathlib import Path

import pytest

from fastface.atomic import atomic_path, write_text_atomic


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "record.json"
    write_text_atomic(target, "first")
    write_text_atomic(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_failed_write_keeps_the_previous_content(tmp_path: Path):
    target = tmp_path / "image.png"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png"]
