"""The one atomic writer: the old file or the new one, never a torn one, and no leftovers."""

from __future__ import annotations

import os

import pytest

from sparsebench.atomic import AtomicPath, atomic_write_text, atomic_write_via, file_mode, remove_stale_temporaries


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write_via(target, fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_written_file_gets_the_mode_of_a_plain_open(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    assert os.stat(tmp_path / "a.txt").st_mode & 0o777 == file_mode()


def test_a_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "tokenizer"
    atomic_write_via(target, lambda tmp: (tmp / "old.json").write_text("1"), directory=True)
    atomic_write_via(target, lambda tmp: (tmp / "new.json").write_text("2"), directory=True)
    assert sorted(p.name for p in target.iterdir()) == ["new.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]


def test_temporaries_of_a_killed_writer_are_found_and_removed(tmp_path):
    AtomicPath(tmp_path / "table.md")  # never committed: what a kill leaves
    AtomicPath(tmp_path / "hf", directory=True)
    (tmp_path / "keep.md").write_text("k")
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.md"]
