"""Fixtures: tiny PNG tars and IDX files built in tmp_path, and the real MNIST tars prepared once
per session."""

import builtins
import errno
import gzip
import io
import json
import os
import struct
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataset  # noqa: E402 (importable only once ROOT is on the path)
import main  # noqa: E402

# The four official IDX files; CI points MNIST_IDX_DIR at its copy of shared/mnist.
SHARED_MNIST = Path(os.environ.get("MNIST_IDX_DIR", ROOT.parent / "shared" / "mnist"))


def png_bytes(pixels, mode="L"):
    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(side=100_000):
    """A PNG whose header claims side x side pixels."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def digit(value):
    """A 28x28 grayscale image whose pixels all equal ``value``."""
    return np.full((28, 28), value, dtype=np.uint8)


def make_tar(path, members):
    """Write a tar of (name, bytes) regular files, or ready-made (TarInfo, bytes or None) pairs."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = name if isinstance(name, tarfile.TarInfo) else tarfile.TarInfo(name)
            if data is None:
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_idx(path, array):
    """An IDX file of unsigned bytes, gzipped when the name ends in .gz."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
    return path


def tiny_idx_dir(root, n_train=64, n_test=32, seed=0):
    """The four IDX files (train gzipped, test not) of random digits; returns (dir, arrays)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        write_idx(root / name, array)
    return root, arrays


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    """data/train.tar and data/test.tar prepared from the real IDX files, once per session."""
    assert SHARED_MNIST.is_dir(), (
        f"{SHARED_MNIST}: the MNIST IDX files are needed; set MNIST_IDX_DIR"
    )
    out = tmp_path_factory.mktemp("data")
    dataset.prepare(out, SHARED_MNIST)
    return out


@pytest.fixture(scope="session")
def one_epoch_run(mnist_dir, tmp_path_factory):
    """A real run: one epoch of every model, main.py's defaults otherwise (55,000 training digits,
    the last 5,000 held out, each model's rule fitted on them)."""
    out = tmp_path_factory.mktemp("runs")
    assert run_main(mnist_dir, out, "--epochs", "1", "--device", "cpu") == 0
    return out / "run"


def run_main(data_dir, out_dir, *extra, name="run"):
    """``python main.py`` on these folders, quietly, in run ``name``; returns the exit code."""
    argv = [
        "--data-dir",
        str(data_dir),
        "--out-dir",
        str(out_dir),
        "--run-name",
        name,
        "--quiet",
        *extra,
    ]
    return main.main(argv)


def interrupt_at(call):
    """A main.train that raises KeyboardInterrupt (Ctrl-C) at its ``call``-th call: monkeypatch it
    in."""
    real_train, calls = main.train, 0

    def train(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    return train


def epochs_without_time(stats_path):
    """The per-epoch rows of a stats.json, without their wall-clock seconds."""
    rows = json.loads(stats_path.read_text())["epochs"]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def make_read_only(monkeypatch, folder):
    """Make ``folder`` behave as on a read-only file system: creating, replacing or deleting
    anything in it fails with EROFS (as root, this machine ignores permission bits, so they cannot
    show it)."""
    folder = os.path.abspath(folder)

    def refuse_inside(path, exists_first=False):
        if os.path.abspath(os.fspath(path)).startswith(folder):
            # mkdir of a folder that is there: EEXIST comes first
            if exists_first and os.path.exists(path):
                raise FileExistsError(errno.EEXIST, "File exists", os.fspath(path))
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    def guard(real, *, target=0, writes=None, exists_first=False):
        def call(*args, **kwargs):
            path = args[target]
            if isinstance(path, (str, os.PathLike)) and (writes is None or writes(*args, **kwargs)):
                refuse_inside(path, exists_first)
            return real(*args, **kwargs)

        return call

    def writes_mode(file, mode="r", *args, **kwargs):
        return any(c in mode for c in "wxa+")

    def writes_flags(path, flags, *args, **kwargs):
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    # The os functions, and pathlib's own bindings of them (Python 3.10 bound them at import).
    monkeypatch.setattr(builtins, "open", guard(builtins.open, writes=writes_mode))
    monkeypatch.setattr(io, "open", guard(io.open, writes=writes_mode))
    monkeypatch.setattr(os, "open", guard(os.open, writes=writes_flags))
    for name in ("unlink", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
        monkeypatch.setattr(Path, name, guard(getattr(Path, name)))
    for name in ("replace", "rename"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), target=1))
        monkeypatch.setattr(Path, name, guard(getattr(Path, name), target=1))
    monkeypatch.setattr(os, "mkdir", guard(os.mkdir, exists_first=True))
    monkeypatch.setattr(Path, "mkdir", guard(Path.mkdir, writes=lambda p, *a, **k: not p.is_dir()))
    monkeypatch.setattr(
        Path, "open", guard(Path.open, writes=lambda p, mode="r", *a, **k: writes_mode(p, mode))
    )


def centre_of_mass(images):
    """(x, y) of each image's centre of mass, in pixels."""
    mass = images.sum((1, 2, 3))
    positions = torch.arange(images.shape[-1], dtype=images.dtype)
    x = (images.sum(2).squeeze(1) * positions).sum(1) / mass
    y = (images.sum(3).squeeze(1) * positions).sum(1) / mass
    return torch.stack([x, y], 1)
