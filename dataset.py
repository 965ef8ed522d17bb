"""MNIST as the course hands it out: tar files of PNGs named ``{ID}_{Label}.png``.

    python dataset.py prepare --idx-dir DIR --out data   # tars from the four IDX files
    python dataset.py prepare --out data                 # tars from a download

``MNIST(data_dir)`` reads a split (a ``.tar``, or the folder of PNGs it extracts
to), decodes every PNG once into a single uint8 tensor, and caches a tar's tensor
beside it in ``.cache/``, keyed by the tar's content. Items are ``(image, label)``: a float
tensor of shape (1, 28, 28), scaled to [0, 1] then normalized with the MNIST
mean and std, and an int label read from the file name.

Indexing with a list or tensor of indices returns a whole batch at once, so
``batch_loader`` (a ``DataLoader`` over ``BatchSlices``) slices batches straight
from memory.
"""

import contextlib
import copy
import glob
import gzip
import io
import math
import operator
import re
import shutil
import sys
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import MNIST as TorchvisionMNIST
from torchvision.datasets.utils import calculate_md5, download_url
from torchvision.transforms.v2 import functional as TF

import cli
from distortions import DISTORT_CHUNK, distort
from files import atomic_open, file_digest, remove_empty, writable_folder

MEAN, STD = 0.1307, 0.3081
IMAGE_SIDE = 28  # pixels: every MNIST digit is a square of this side
TEST_BATCH_SIZE = 1000  # evaluation: no gradients, so bigger batches are just faster
NAME_RE = re.compile(r"(\d+)_(\d+)\.png", re.IGNORECASE)
CACHE_VERSION = 1

# The four IDX files by split, in the names the mirrors use, with official MD5s.
IDX_FILES = dict(TorchvisionMNIST.resources)
MIRRORS = TorchvisionMNIST.mirrors  # tried in turn; read when a download starts
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetError(Exception):
    """Bad or missing input data; the message is one sentence naming the file."""


# ------------------------------------------------------------ reading


def _skipped(name):
    """Not data: non-PNGs, hidden files, macOS resource forks (``._x``, ``__MACOSX/``)."""
    parts = Path(name).parts
    hidden = any(p.startswith(".") and p not in (".", "..") for p in parts)
    return hidden or "__MACOSX" in parts or not name.lower().endswith(".png")


def _decode_png(data, where):
    """Decode one PNG to a (28, 28) uint8 array; grey RGB(A) is read as grayscale."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            size = f"{img.width}x{img.height}"
            if img.width * img.height > 64 * IMAGE_SIDE**2:  # before any pixel is decoded
                raise DatasetError(f"{where}: image claims {size} pixels, refusing to decode it")
            if img.size != (IMAGE_SIDE, IMAGE_SIDE):
                raise DatasetError(f"{where}: image is {size}, expected 28x28")
            if img.mode in ("1", "P"):
                img = img.convert("L")
            pixels = np.asarray(img)
    except Image.DecompressionBombError:
        message = f"{where}: image has an absurd pixel count (decompression bomb)"
        raise DatasetError(message) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{where}: not a decodable PNG ({e})") from None
    if pixels.dtype != np.uint8:
        raise DatasetError(f"{where}: pixel type {pixels.dtype} is not 8-bit grayscale")
    if pixels.ndim == 3:  # LA, RGB or RGBA: keep the colour bands, drop alpha
        colour = pixels[..., : 3 if pixels.shape[2] >= 3 else 1]
        if (colour != colour[..., :1]).any():
            raise DatasetError(f"{where}: colour image, expected grayscale")
        pixels = colour[..., 0]
    return pixels


def _parse_name(name, where):
    match = NAME_RE.fullmatch(Path(name).name)
    if match is None:
        raise DatasetError(f"{where}: file name is not {{ID}}_{{Label}}.png")
    image_id, label = int(match[1]), int(match[2])
    if label > 9:
        raise DatasetError(f"{where}: label {label} is outside 0-9")
    return image_id, label


def _iter_tar(path):
    """Yield (member name, bytes) of the tar's regular files, read in memory only.

    Nothing is extracted, so absolute paths, '..', links and devices cannot write
    anywhere. Links and devices are skipped; both kinds of member are counted in
    one warning, since they change what the tar seems to hold.
    """
    try:
        # opened apart from the ``with`` below, so that only opening says "not a tar archive"
        tar = tarfile.open(path, "r:*")  # noqa: SIM115
    except (tarfile.TarError, OSError):
        raise DatasetError(f"{path}: not a tar archive") from None
    links = outside = 0
    with tar:
        try:
            for member in tar:
                if not member.isfile():
                    links += not member.isdir()
                elif not _skipped(member.name):
                    name = PurePosixPath(member.name)
                    outside += name.is_absolute() or ".." in name.parts
                    yield member.name, tar.extractfile(member).read()
            # tarfile takes a cut at a member boundary for the end: a whole archive ends in zeros.
            tar.fileobj.seek(tar.offset)
            end = tar.fileobj.read(tarfile.BLOCKSIZE)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise DatasetError(f"{path}: truncated or corrupt tar archive ({e})") from None
        if end != bytes(tarfile.BLOCKSIZE):
            raise DatasetError(
                f"{path}: truncated tar archive (no end-of-archive marker after {tar.offset} bytes)"
            )
    notes = [f"skipped {links} link or device member(s)"] * bool(links)
    inside = "in memory (nothing is extracted)"
    notes += [f"read {outside} member(s) with an absolute or '..' path {inside}"] * bool(outside)
    if notes:
        cli.warning(f"{path}: {'; '.join(notes)}")


def _iter_dir(path):
    for file in sorted(path.rglob("*")):
        name = file.relative_to(path).as_posix()
        if file.is_file() and not _skipped(name):
            yield name, file.read_bytes()


def decode_split(path):
    """Every PNG of a tar or folder, decoded: (uint8 images N x 28 x 28, int64 labels N), by ID."""
    path = Path(path)
    members = _iter_dir(path) if path.is_dir() else _iter_tar(path)
    seen, images, labels = {}, [], []
    for name, data in members:
        where = f"{path}: {name}"
        image_id, label = _parse_name(name, where)
        if image_id in seen:
            raise DatasetError(f"{where}: ID {image_id} already used by {seen[image_id]}")
        seen[image_id] = name
        images.append(_decode_png(data, where))
        labels.append(label)
    if not images:
        raise DatasetError(f"{path}: holds no PNG images named {{ID}}_{{Label}}.png")
    order = np.argsort(np.fromiter(seen, dtype=np.int64, count=len(seen)), kind="stable")
    return torch.from_numpy(np.stack(images)[order]), torch.tensor(labels)[order]


def load_split(path):
    """Decoded (images, labels) of a split; a tar's are cached in ``.cache/`` beside it."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    if path.is_dir():
        return decode_split(path)
    cache = path.parent / ".cache" / f"{path.name}.{file_digest(path)}.v{CACHE_VERSION}.pt"
    with contextlib.suppress(Exception):  # a damaged cache is decoded afresh
        saved = torch.load(cache, weights_only=True)
        return saved["images"], saved["labels"]
    images, labels = decode_split(path)
    try:
        # caches of an earlier version of this tar
        for stale in cache.parent.glob(f"{glob.escape(path.name)}.*.pt"):
            stale.unlink()
        with atomic_open(cache) as f:
            torch.save({"images": images, "labels": labels}, f)
    except OSError as e:  # a read-only data folder: work without the cache
        cli.warning(
            f"{cache.parent}: cannot write the cache there ({e.strerror}); working without it"
        )
    return images, labels


# ------------------------------------------------------------ dataset


def to_unit(images):
    """uint8 images (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]."""
    return TF.to_dtype(images.unsqueeze(1), torch.float32, scale=True)


def normalize(images):
    """Standardize [0, 1] images with the MNIST training set's mean and std."""
    return TF.normalize(images, [MEAN], [STD])


class MNIST(Dataset):
    """One MNIST split, as the course template has it: ``MNIST(data_dir)``.

    Args:
        data_dir: directory path containing images (``{ID}_{Label}.png``, e.g. the
            extracted ``data/train/``), or the ``.tar`` they came in (``data/train.tar``).
        limit: keep only the first ``limit`` items (by ID), for quick runs.

    ``distorted()`` gives the split with every image augmented, anew for each epoch.
    """

    def __init__(self, data_dir, limit=None):
        self.path = Path(data_dir)
        self.images, self.labels = load_split(self.path)  # (N, 28, 28) uint8, (N,) int64
        if limit is not None:
            self.images, self.labels = self.images[:limit], self.labels[:limit]
        self.augmented = False
        # Scaled and normalized once, as a whole: serving a batch is then a single gather.
        self.normalized = normalize(to_unit(self.images))  # (N, 1, 28, 28) float32

    def __len__(self):
        return len(self.labels)

    def distorted(self, without=()):
        """This split with every image distorted by ``distort`` (leaving out the parts ``without``
        names), a new draw at each call (torch's global RNG): lenet5_reg's training set for one
        epoch. The labels and uint8 images are shared.

        The whole split is distorted at once, a chunk at a time, before its batches are served: a
        batch of 32 is too small for the distortion's many small operations to be cheap.
        """
        split = copy.copy(self)
        distorted = [distort(to_unit(chunk), without) for chunk in self.images.split(DISTORT_CHUNK)]
        split.normalized, split.augmented = normalize(torch.cat(distorted)), True
        return split

    def held_out(self, size):
        """(this split without its last ``size`` items, those last items), sharing its tensors; the
        second is None when ``size`` is 0. The validation split of ``--val-size``."""
        if not size:
            return self, None
        keep, held = copy.copy(self), copy.copy(self)
        for name in ("images", "labels", "normalized"):
            setattr(keep, name, getattr(self, name)[:-size])
            setattr(held, name, getattr(self, name)[-size:])
        return keep, held

    def to(self, device):
        """Keep the split on ``device`` (a GPU), so batches are sliced and distorted there."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        self.normalized = self.normalized.to(device)
        return self

    @property
    def device(self):
        return self.labels.device

    def __getitem__(self, index):
        """One index gives one (image (1, 28, 28), label int): an int, a numpy integer or a 0-d
        integer tensor (what ``Subset(ds, np.arange(n))`` hands over); a list or tensor of indices a
        batch (N, 1, 28, 28), (N,)."""
        if isinstance(index, int) or getattr(index, "ndim", None) == 0:
            image, label = self[[operator.index(index)]]
            return image[0], int(label[0])
        # index_select: the fastest gather of rows (docs/performance.md)
        index = torch.as_tensor(index, device=self.device)
        return self.normalized.index_select(0, index), self.labels.index_select(0, index)


class BatchSlices(Sampler):
    """Index tensors of whole batches: slices of a seeded permutation, or of 0..N-1 without one.

    With a generator it visits the same order as ``BatchSampler(RandomSampler(data, generator=g),
    ...)``, at a fraction of the cost: no Python list per batch. The order is drawn on the CPU, so
    it is the same on every device, then moved to ``device`` once per epoch: on a GPU, copying a
    small index to the device for every batch would make each step wait for the one before."""

    def __init__(self, size, batch_size, generator=None, device=None):
        self.size, self.batch_size = size, batch_size
        self.generator, self.device = generator, device

    def __len__(self):
        return math.ceil(self.size / self.batch_size)

    def __iter__(self):
        if self.generator is None:
            order = torch.arange(self.size)
        else:
            order = torch.randperm(self.size, generator=self.generator)
        return iter(order.to(self.device).split(self.batch_size))


def batch_loader(split, batch_size, generator=None):
    """Whole batches sliced from an in-memory ``MNIST`` split; shuffled with a ``generator``."""
    # batch_size=None: each index the sampler yields already selects a batch; no per-item collation.
    sampler = BatchSlices(len(split), batch_size, generator, split.device)
    return DataLoader(split, batch_size=None, sampler=sampler)


# ------------------------------------------------------------ preparing the tars


def read_idx(path):
    """An IDX file (gzipped or not) of unsigned bytes as a numpy array."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise DatasetError(f"{path}: size does not match its header {shape}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def write_split_tar(images, labels, out, split):
    """Write ``out`` (``{split}/{ID:05d}_{Label}.png``) atomically."""
    with atomic_open(out) as f, tarfile.open(fileobj=f, mode="w") as tar:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            png = io.BytesIO()
            Image.fromarray(image, mode="L").save(png, format="PNG")
            info = tarfile.TarInfo(f"{split}/{i:05d}_{label}.png")
            info.size, info.mode = png.tell(), 0o644
            png.seek(0)
            tar.addfile(info, png)


def _find_idx(idx_dir, stem):
    for name in (f"{stem}.gz", stem):
        if (idx_dir / name).is_file():
            return idx_dir / name
    raise DatasetError(f"{idx_dir}: neither {stem}.gz nor {stem} is there")


def _check_trusted(path):
    expected = IDX_FILES.get(path.name) or IDX_FILES.get(f"{path.name}.gz")
    if path.suffix == ".gz" and calculate_md5(path) != expected:
        cli.warning(f"{path}: MD5 differs from the official file; using it as given")


def download_idx(raw_dir, mirrors=None):
    """The four IDX files downloaded into ``raw_dir`` from ``mirrors`` (MIRRORS), MD5-checked.

    A file that fails is deleted, and so is ``raw_dir`` if this call made it: a failed
    download leaves nothing behind.
    """
    made = not raw_dir.exists()
    try:
        for name, md5 in IDX_FILES.items():
            _download(raw_dir, name, md5, mirrors or MIRRORS)
    except BaseException:
        if made:
            shutil.rmtree(raw_dir, ignore_errors=True)
        raise
    return raw_dir


def _download(raw_dir, name, md5, mirrors):
    target, failures = raw_dir / name, []
    for mirror in mirrors:
        try:
            download_url(f"{mirror}{name}", raw_dir, name, md5)
            return target
        except RuntimeError:  # downloaded, but the checksum is wrong
            target.unlink(missing_ok=True)
            print(f"{mirror}{name}: MD5 is not the official {md5}; deleted it", file=sys.stderr)
            failures.append(f"{mirror}{name} (wrong MD5)")
        except OSError as e:
            target.unlink(missing_ok=True)
            if e.filename is not None:  # this machine's disk, not the network
                message = f"{raw_dir}: cannot write the download there ({e.strerror})"
                raise DatasetError(message) from None
            failures.append(f"{mirror}{name} ({getattr(e, 'reason', e)})")
        except BaseException:
            target.unlink(missing_ok=True)
            raise
    offline = not all(f.endswith("(wrong MD5)") for f in failures)
    network = ", or connect to the internet and run again" if offline else ""
    raise DatasetError(
        f"Could not download {name}; tried: {'; '.join(failures)}. "
        f"Either put train.tar and test.tar in {raw_dir.parent}, "
        f"or pass --idx-dir DIR naming a folder with the four MNIST IDX files{network}."
    )


def prepare(out="data", idx_dir=None, splits=("train", "test"), mirrors=None):
    """Write ``out/{split}.tar`` for each split from the IDX files in ``idx_dir``, or a download.

    Files in ``idx_dir`` are trusted input: an MD5 that differs from the
    official one is only a warning. Returns the paths written. A failure leaves
    nothing behind: no tar, no download, no folder that was not there before.
    """
    out = Path(out)
    if idx_dir is not None and not Path(idx_dir).is_dir():
        raise DatasetError(f"{idx_dir}: no such directory")
    try:
        made = writable_folder(out)
    except OSError as e:
        raise DatasetError(f"{out}: cannot write the tars there ({e.strerror})") from None
    try:
        idx_dir = download_idx(out / "raw", mirrors) if idx_dir is None else Path(idx_dir)
        written = []
        for split in splits:
            paths = [_find_idx(idx_dir, stem) for stem in SPLITS[split]]
            for path in paths:
                _check_trusted(path)
            images, labels = (read_idx(p) for p in paths)
            if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or len(images) != len(labels):
                raise DatasetError(
                    f"{paths[0]}: {images.shape} images do not fit {len(labels)} labels"
                    " of 28x28 digits"
                )
            write_split_tar(images, labels, out / f"{split}.tar", split)
            written.append(out / f"{split}.tar")
    except BaseException:
        remove_empty(made)
        raise
    return written


def split_path(data_dir, split, folders=True):
    """Where a split is in ``data_dir``: ``{split}.tar`` if it is there, else (with ``folders``) the
    folder ``{split}/`` of PNGs it extracts to; None when neither is."""
    tar, folder = Path(data_dir) / f"{split}.tar", Path(data_dir) / split
    return tar if tar.is_file() else folder if folders and folder.is_dir() else None


def find_splits(data_dir="data", idx_dir=None, folders=True):
    """(train, test) paths in ``data_dir`` (``split_path``); a missing split is prepared first."""
    found = {split: split_path(data_dir, split, folders) for split in SPLITS}
    missing = [split for split, path in found.items() if path is None]
    if missing:
        source = idx_dir or "a download"
        print(
            f"{data_dir}: {' and '.join(f'{s}.tar' for s in missing)} missing;"
            f" preparing from {source}",
            file=sys.stderr,
        )
        found.update(zip(missing, prepare(data_dir, idx_dir, splits=missing), strict=True))
    return found["train"], found["test"]


def load_splits(data_dir, idx_dir, device, train_limit=None, test_limit=None):
    """The training and test sets in ``data_dir`` (``find_splits``), on ``device``; DatasetError
    if unreadable."""
    try:
        train_path, test_path = find_splits(data_dir, idx_dir)
        train = MNIST(train_path, limit=train_limit).to(device)
        return train, MNIST(test_path, limit=test_limit).to(device)
    except OSError as e:
        raise DatasetError(f"{e.filename}: cannot read it ({e.strerror})") from None


def parse_args(argv=None):
    parser = cli.parser("dataset.py", __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser(
        "prepare",
        help="write train.tar and test.tar in the course layout",
        formatter_class=cli.HelpFormatter,
    )
    prep.add_argument(
        "--idx-dir",
        type=Path,
        help="folder with the four IDX files (.gz or not); without it, a download",
    )
    prep.add_argument("--out", type=Path, default=Path("data"), help="folder to write the tars to")
    return parser.parse_args(cli.arguments(argv))


def main(argv=None):
    args = parse_args(argv)
    try:
        for path in prepare(args.out, args.idx_dir):
            print(path)
    except DatasetError as e:
        cli.error(e)
        return 1
    return 0


if __name__ == "__main__":
    cli.safe_console()
    sys.exit(main(sys.argv[1:]))
