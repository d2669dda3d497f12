"""Atomic writes: an interrupted write leaves neither a partial file nor a partial folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlab.io import atomic_open, is_complete, mark_complete, staging_dir, write_json


def test_atomic_open_keeps_old_file_when_interrupted(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("good")
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("half")
        raise RuntimeError("crash")
    assert target.read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_staging_dir_swaps_in_only_when_complete(tmp_path: Path) -> None:
    final = tmp_path / "site"
    with pytest.raises(RuntimeError), staging_dir(final) as tmp:
        (tmp / "a.ndjson").write_text("{}\n")
        raise RuntimeError("crash")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with staging_dir(final) as tmp:
        write_json(tmp / "x.json", {"a": 1})
        mark_complete(tmp, {"n": 1})
    assert is_complete(final)
    assert (final / "x.json").is_file()


def test_staging_dir_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    final = tmp_path / "site"
    stale = tmp_path / ".site.abc123.partial"
    (stale / "bulk").mkdir(parents=True)
    (stale / "bulk" / "Patient.ndjson").write_text("{}\n")
    with staging_dir(final) as tmp:
        mark_complete(tmp, {"n": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]
