"""files.py: a write reaches the disk before it replaces the old file, a failed write leaves the
old file and nothing else, and JSON reads back as written."""

import errno
import hashlib
import json

import pytest

import files


def test_a_write_reaches_the_disk_before_it_replaces_the_old_file(tmp_path, monkeypatch):
    calls, real_fsync, real_replace = [], files.os.fsync, files.os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(
        files.os, "replace", lambda a, b: calls.append("replace") or real_replace(a, b)
    )
    files.write_text(tmp_path / "f.json", "{}")
    assert calls[:2] == ["fsync", "replace"] and (tmp_path / "f.json").read_text() == "{}"


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="the writer failed"), files.atomic_open(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("the writer failed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["stats.json"]


def test_a_disk_error_names_the_file_being_written_not_the_temporary(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError) as raised:
        files.write_text(tmp_path / "last.json", "{}")
    assert raised.value.filename == str(tmp_path / "last.json")
    assert raised.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


def test_json_keeps_a_folder_name_that_is_not_text_and_reads_back_the_same(tmp_path):
    odd = "runs/caf\udce9"  # the byte 0xE9 of a Latin-1 name, as Python holds it under UTF-8
    files.write_json(tmp_path / "config.json", {"run": odd, "name": "한글"})
    text = (tmp_path / "config.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"run": odd, "name": "한글"}


def test_the_digest_is_the_sha1_of_the_files_bytes(tmp_path):
    (tmp_path / "f").write_bytes(b"abc" * 500_000)  # more than one megabyte, read in two pieces
    assert files.file_digest(tmp_path / "f") == hashlib.sha1(b"abc" * 500_000).hexdigest()


def test_a_writable_folder_is_made_with_its_parents_and_removed_again_when_empty(tmp_path):
    made = files.writable_folder(tmp_path / "a/b/c")
    assert made == [tmp_path / "a/b/c", tmp_path / "a/b", tmp_path / "a"]
    (tmp_path / "a/keep").write_text("x")
    files.remove_empty(made)
    assert not (tmp_path / "a/b").exists() and (tmp_path / "a/keep").exists()
