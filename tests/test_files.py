"""files.py: a write reaches the disk before it replaces the old file."""

import files


def test_a_write_reaches_the_disk_before_it_replaces_the_old_file(tmp_path, monkeypatch):
    calls, real_fsync, real_replace = [], files.os.fsync, files.os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(
        files.os, "replace", lambda a, b: calls.append("replace") or real_replace(a, b)
    )
    files.write_text(tmp_path / "f.json", "{}")
    assert calls[:2] == ["fsync", "replace"] and (tmp_path / "f.json").read_text() == "{}"
