"""erw_fast.atomic: the one write protocol (temp file, fsync, rename, directory fsync) behind every durable file."""

import os

import pytest

from erw_fast.atomic import TMP_PREFIX, atomic_write, atomic_write_bytes, atomic_write_text, remove_temp_files


def test_write_replace_and_failure_keep_a_whole_file(tmp_path):
    path = tmp_path / "sub" / "a.json"
    assert atomic_write_text(path, "one\n") == path and path.read_text() == "one\n"  # the directory is created
    atomic_write_bytes(path, b"two\n")
    assert path.read_bytes() == b"two\n"

    def dies(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, dies)
    assert path.read_bytes() == b"two\n" and os.listdir(path.parent) == ["a.json"]  # old file kept, temp gone


def test_order_is_file_fsync_rename_directory_fsync(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    atomic_write_bytes(tmp_path / "x", b"x")
    assert events == (["fsync", "replace", "fsync"] if os.name != "nt" else ["fsync", "replace"])


def test_leftover_temps_are_hidden_and_removable(tmp_path):
    (tmp_path / f"{TMP_PREFIX}x.bin.1.ab").write_bytes(b"torn")  # what a killed writer leaves
    atomic_write_bytes(tmp_path / "x.bin", b"whole")
    assert sorted(os.listdir(tmp_path)) == [f"{TMP_PREFIX}x.bin.1.ab", "x.bin"]  # a write leaves others' temps
    remove_temp_files(tmp_path)
    assert os.listdir(tmp_path) == ["x.bin"]
