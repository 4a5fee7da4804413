import os

import pytest

from memwise.report.atomic import write_atomic


def test_write_atomic_replaces_the_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"old")

    assert write_atomic(path, b"new") == path

    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_write_atomic_leaves_the_old_file_when_replace_fails(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_bytes(b"old")

    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, b"new")

    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
