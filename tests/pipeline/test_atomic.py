"""atomic.py: a write either replaces the file whole or leaves the old one, never a temporary file behind."""

from __future__ import annotations

import json

import pytest

from reference_pipeline.atomic import atomic_path, atomic_write_json, atomic_write_text


def test_write_replaces_the_file_and_creates_parent_folders(tmp_path):
    path = tmp_path / "a" / "b" / "note.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["note.txt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    atomic_write_json(path, {"ap": 1.0})
    with pytest.raises(RuntimeError, match="disk"), atomic_path(path) as tmp:
        tmp.write_text('{"ap": ')  # half written
        raise RuntimeError("disk full")
    assert json.loads(path.read_text()) == {"ap": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_content_is_invisible_at_the_destination_until_the_block_ends(tmp_path):
    path = tmp_path / "weights.bin"
    with atomic_path(path, suffix=".tmp.bin") as tmp:
        tmp.write_bytes(b"123")
        assert not path.exists() and tmp.name.endswith(".tmp.bin") and tmp.parent == path.parent
    assert path.read_bytes() == b"123"
