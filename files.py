"""Files that no crash leaves half-written, their digests, and JSON that reads back as written.

Every file this project writes (the tars, their caches, config.json, stats.json, last.pt, the
figures' report) goes through ``atomic_open``: it is the old file or the new one, never a mix.
"""

import contextlib
import hashlib
import json
import os
import secrets
import tempfile
import time
from pathlib import Path


def file_digest(path):
    """The SHA-1 of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha1()  # hashlib.file_digest would do, from Python 3.11 on
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_open(path):
    """Write ``path`` (binary) through a new temporary file beside it, renamed over ``path`` on
    success.

    The file is flushed to disk before the rename, and the folder after it, so neither a
    killed writer nor a power cut leaves a half-written ``path``: it is the old file or
    the new one. On error the temporary file is deleted, and an OSError names ``path``,
    never the temporary. Only calls that Windows, macOS and Linux all have.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    _fsync_folder(path.parent)


def write_text(path, text):
    """Write ``text`` to ``path`` atomically, as UTF-8 whatever the system's locale. A folder name
    that is not text in the system's encoding (Python holds its bytes as lone surrogates) is
    written as the bytes the system gave."""
    with atomic_open(path) as f:
        f.write(text.encode("utf-8", "surrogateescape"))


def write_json(path, obj):
    """``obj`` as JSON in UTF-8; a folder name that is not text in the system's encoding is kept as
    JSON escapes (\\udcXX), so that reading the file back gives the same path."""
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, indent=2)
    write_text(path, text + "\n")


def _replace(tmp, path, waits=(0.05, 0.1, 0.2, 0.4, 0.8)):
    """os.replace, retried for about 1.5 s: on Windows it is refused while another program
    (a sync client, an antivirus, an editor) holds ``path`` open."""
    for wait in (*waits, None):
        try:
            return os.replace(tmp, path)
        except PermissionError as e:
            if wait is None:
                reason = f"{e.strerror} (is it open in another program?)"
                raise PermissionError(e.errno, reason, str(path)) from None
            time.sleep(wait)


def _fsync_folder(folder):
    """Flush a folder's entries (a rename) to disk where it can be: Windows cannot open folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def writable_folder(folder):
    """Make ``folder`` (and its missing parents) if need be and check that files can be written
    in it; returns the folders it made, deepest first, so that a failure can remove them again.
    OSError when it cannot."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        remove_empty(made)
        raise
    return made


def remove_empty(folders):
    """Remove each of ``folders`` that is empty, in order; the others stay."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
