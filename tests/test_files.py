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
    # the file, the rename, then the folder that holds the rename
    assert calls == ["fsync", "replace", "fsync"] and (tmp_path / "f.json").read_text() == "{}"


def test_a_rename_refused_for_a_while_is_tried_again(tmp_path, monkeypatch):
    refusals, real_replace = [PermissionError(13, "Access is denied")] * 2, files.os.replace

    def replace(a, b):
        if refusals:
            raise refusals.pop()
        real_replace(a, b)

    monkeypatch.setattr(files.os, "replace", replace)
    monkeypatch.setattr(files.time, "sleep", lambda seconds: None)
    files.write_text(tmp_path / "stats.json", "{}")
    assert (tmp_path / "stats.json").read_text() == "{}" and not refusals


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


def test_a_folder_files_cannot_be_written_in_is_an_error_and_what_was_made_is_removed(
    tmp_path, monkeypatch
):
    def refused(dir):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(files.tempfile, "TemporaryFile", refused)
    with pytest.raises(PermissionError):
        files.writable_folder(tmp_path / "runs/new")
    assert list(tmp_path.iterdir()) == []


def test_a_writable_folder_is_made_with_its_parents_and_removed_again_when_empty(tmp_path):
    made = files.writable_folder(tmp_path / "a/b/c")
    assert made == [tmp_path / "a/b/c", tmp_path / "a/b", tmp_path / "a"]
    (tmp_path / "a/keep").write_text("x")
    files.remove_empty(made)
    assert not (tmp_path / "a/b").exists() and (tmp_path / "a/keep").exists()


def test_text_is_written_as_utf_8_and_a_name_that_is_not_text_as_the_systems_bytes(tmp_path):
    files.write_text(tmp_path / "report.md", "한글 café\n")
    assert (tmp_path / "report.md").read_bytes() == "한글 café\n".encode()
    files.write_text(tmp_path / "command", "runs/caf\udce9")
    assert (tmp_path / "command").read_bytes() == b"runs/caf\xe9"
