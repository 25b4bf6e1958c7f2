"""Atomic writes: a failed write leaves the old file and no temporary behind."""

from __future__ import annotations

import pytest

from caries_mim.atomic_files import atomic_path, atomic_write_bytes


def test_write_replaces_the_target_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_an_error_mid_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.dcm"
    target.write_bytes(b"complete old file")

    def interrupted_write() -> None:
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half of a new")
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        interrupted_write()
    assert target.read_bytes() == b"complete old file"
    assert [p.name for p in tmp_path.iterdir()] == ["out.dcm"]


def test_concurrent_writers_get_distinct_temporaries(tmp_path):
    target = tmp_path / "entry"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        first.write_bytes(b"a")
        second.write_bytes(b"b")
    assert target.read_bytes() == b"a"  # the outer context finishes last
