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

import argparse
import contextlib
import copy
import glob
import gzip
import hashlib
import io
import math
import operator
import os
import re
import secrets
import shutil
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import MNIST as TorchvisionMNIST
from torchvision.datasets.utils import calculate_md5, download_url
from torchvision.transforms.v2 import functional as TF

MEAN, STD = 0.1307, 0.3081
IMAGE_SIZE = 28
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


# --------------------------------------------------------------------------- reading


def _skipped(name):
    """Names that are not data: non-PNGs, hidden files, macOS resource forks (``._x``, ``__MACOSX/``)."""
    parts = Path(name).parts
    hidden = any(p.startswith(".") and p not in (".", "..") for p in parts)
    return hidden or "__MACOSX" in parts or not name.lower().endswith(".png")


def _decode_png(data, where):
    """Decode one PNG to a (28, 28) uint8 array; grey RGB(A) is read as grayscale."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > 64 * IMAGE_SIZE * IMAGE_SIZE:  # checked before any pixel is decoded
                raise DatasetError(f"{where}: image claims {img.width}x{img.height} pixels, refusing to decode it")
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                raise DatasetError(f"{where}: image is {img.width}x{img.height}, expected 28x28")
            if img.mode in ("1", "P"):
                img = img.convert("L")
            pixels = np.asarray(img)
    except Image.DecompressionBombError:
        raise DatasetError(f"{where}: image has an absurd pixel count (decompression bomb)") from None
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
        tar = tarfile.open(path, "r:*")
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
            # tarfile takes a cut at a member boundary for the end: a whole archive ends in zero blocks.
            tar.fileobj.seek(tar.offset)
            end = tar.fileobj.read(tarfile.BLOCKSIZE)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise DatasetError(f"{path}: truncated or corrupt tar archive ({e})") from None
        if end != bytes(tarfile.BLOCKSIZE):
            raise DatasetError(f"{path}: truncated tar archive (no end-of-archive marker after {tar.offset} bytes)")
    notes = [f"skipped {links} link or device member(s)"] if links else []
    notes += (
        [f"read {outside} member(s) with an absolute or '..' path in memory (nothing is extracted)"] if outside else []
    )
    if notes:
        print(f"warning: {path}: {'; '.join(notes)}", file=sys.stderr)


def _iter_dir(path):
    for file in sorted(path.rglob("*")):
        name = file.relative_to(path).as_posix()
        if file.is_file() and not _skipped(name):
            yield name, file.read_bytes()


def decode_split(path):
    """Decode every PNG of a tar or directory into (images uint8 N x 28 x 28, labels int64 N), ordered by ID."""
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


def file_digest(path):
    digest = hashlib.sha1()  # hashlib.file_digest would do, from Python 3.11 on
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_open(path):
    """Write ``path`` (binary) through a new temporary file beside it, renamed over ``path`` on success.

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
    """Write ``text`` to ``path`` atomically, as UTF-8 whatever the system's locale. A folder name that
    is not text in the system's encoding (Python holds its bytes as lone surrogates) is written as the
    bytes the system gave."""
    with atomic_open(path) as f:
        f.write(text.encode("utf-8", "surrogateescape"))


def _replace(tmp, path, waits=(0.05, 0.1, 0.2, 0.4, 0.8)):
    """os.replace, retried for about 1.5 s: on Windows it is refused while another program
    (a sync client, an antivirus, an editor) holds ``path`` open."""
    for wait in (*waits, None):
        try:
            return os.replace(tmp, path)
        except PermissionError as e:
            if wait is None:
                raise PermissionError(e.errno, f"{e.strerror} (is it open in another program?)", str(path)) from None
            time.sleep(wait)


def _fsync_folder(folder):
    """Flush a folder's entries (a rename) to disk where the system allows it; Windows cannot open folders."""
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
        for stale in cache.parent.glob(f"{glob.escape(path.name)}.*.pt"):  # caches of an earlier version of this tar
            stale.unlink()
        with atomic_open(cache) as f:
            torch.save({"images": images, "labels": labels}, f)
    except OSError as e:  # a read-only data folder: work without the cache
        print(
            f"warning: {cache.parent}: cannot write the cache there ({e.strerror}); working without it", file=sys.stderr
        )
    return images, labels


# --------------------------------------------------------------------------- dataset


def to_unit(images):
    """uint8 images (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]."""
    return TF.to_dtype(images.unsqueeze(1), torch.float32, scale=True)


def normalize(images):
    """Standardize [0, 1] images with the MNIST training set's mean and std."""
    return TF.normalize(images, [MEAN], [STD])


def affine(batch, angle, scale, shift, shear):
    """Each image of a (N, 1, H, W) batch turned by its own ``angle`` (radians), zoomed by ``scale``,
    sheared along x by ``shear`` (radians) and moved by ``shift`` (N, 2: x and y, in pixels).

    One ``affine_grid`` + ``grid_sample`` call for the whole batch (torchvision's ``affine`` takes one
    set of parameters per call); the background (0) fills what comes in from outside.
    """
    n, _, height, width = batch.shape
    cos, sin, tan = angle.cos(), angle.sin(), shear.tan()
    # The grid maps output to input coordinates: the inverse of x -> zoom(shear(rotate(x))) + shift.
    rows = [torch.stack([cos, sin - cos * tan, torch.zeros_like(cos)], 1),
            torch.stack([-sin, cos + sin * tan, torch.zeros_like(cos)], 1)]  # fmt: skip
    theta = torch.stack(rows, 1) / scale.view(n, 1, 1)
    moved = torch.stack([shift[:, 0] * 2 / width, shift[:, 1] * 2 / height], 1)  # the grid spans [-1, 1]
    theta[:, :, 2] = -(theta[:, :, :2] @ moved.unsqueeze(2)).squeeze(2)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, align_corners=False, padding_mode="zeros")


def lift(batch, level):
    """The background raised toward white: 0 becomes ``level`` and 1 stays 1 (level per image, or one)."""
    return torch.lerp(batch, torch.ones_like(batch), _per_image(level, batch))


def thicker(batch, width, steps=1):
    """Strokes thickened by ``width`` pixels on each side (one number, or one per image), at most ``steps``:
    grey dilation with a 3x3 square once per whole pixel, the last fraction blended in."""
    width = _per_image(width, batch)
    for step in range(steps):
        batch = torch.lerp(batch, F.max_pool2d(batch, 3, stride=1, padding=1), (width - step).clamp(0, 1))
    return batch


def thinner(batch, width, steps=1):
    """Strokes thinned by ``width`` pixels on each side: grey erosion, the dilation of the negative."""
    return -thicker(-batch, width, steps)


def cover(batch, side, generator=None):
    """A square of ``side`` pixels (per image, or one) set to the background, placed at random so that
    its centre lies on the digit's 20x20 box."""
    n, _, height, width = batch.shape
    side = _per_image(side, batch).view(n, 1)
    centre = torch.rand(n, 2, generator=generator, device=batch.device) * 20 + (height - 20) / 2
    rows = torch.arange(height, device=batch.device, dtype=batch.dtype) + 0.5
    cols = torch.arange(width, device=batch.device, dtype=batch.dtype) + 0.5
    inside_y = (rows.view(1, height) - centre[:, :1]).abs() < side / 2  # (N, H)
    inside_x = (cols.view(1, width) - centre[:, 1:]).abs() < side / 2  # (N, W)
    covered = inside_y.unsqueeze(2) & inside_x.unsqueeze(1)
    return batch.masked_fill(covered.unsqueeze(1), 0.0)


def noise(batch, sigma, generator=None):
    """Gaussian noise of standard deviation ``sigma`` (per image, or one), clipped to [0, 1]."""
    grain = torch.randn(batch.shape, generator=generator, device=batch.device, dtype=batch.dtype)
    return (batch + grain * _per_image(sigma, batch)).clamp(0, 1)


def salt_and_pepper(batch, fraction, generator=None):
    """A ``fraction`` of the pixels (per image, or one) set to 0 or 1, half each."""
    draw = torch.rand(batch.shape, generator=generator, device=batch.device, dtype=batch.dtype)
    fraction = _per_image(fraction, batch)
    batch = batch.masked_fill(draw < fraction / 2, 0.0)
    return batch.masked_fill((draw >= fraction / 2) & (draw < fraction), 1.0)


def _per_image(value, batch):
    """A strength as a (N, 1, 1, 1) tensor: one number for every image, or one per image."""
    value = torch.as_tensor(value, dtype=batch.dtype, device=batch.device)
    return value.reshape(-1).expand(batch.shape[0]).reshape(-1, 1, 1, 1)


# lenet5_reg's training augmentation: broad ranges of the ways people's digits differ from MNIST's
# own (docs/recipe.md says why these). Most images get their own rotation, zoom, shear and shift,
# and about half of them one change of look from LOOKS, each with its own strength.
ROTATION, ZOOM, SHEAR, SHIFT = 20.0, (0.75, 1.2), 15.0, 3.0  # degrees either way, scale, degrees, pixels
GEOMETRY_SHARE, LOOK_SHARE = 0.75, 0.4  # the other images keep their shape and place, or their look
LOOKS = {  # each change of look, given per-image strengths u and v, uniform in [0, 1]
    "thinner": lambda batch, u, v: thinner(batch, 1.25 * u, steps=2),  # up to 1.25 pixels off each side
    "thicker": lambda batch, u, v: thicker(batch, 2.5 * u, steps=3),  # up to 2.5 pixels on each side
    "blurred": lambda batch, u, v: blur(batch, 0.5 + 2.5 * torch.rand(()).item()),  # sigma 0.5 to 3, one per call
    "covered": lambda batch, u, v: cover(batch, 4 + 12 * u),  # a square of 4 to 16 pixels
    "grey": lambda batch, u, v: grey(batch, u, v),
    "noisy": lambda batch, u, v: noise(batch, 0.6 * u),
    "speckled": lambda batch, u, v: salt_and_pepper(batch, 0.3 * u),
}
DISTORT_CHUNK = 1024  # images distorted together: few enough that the blur's sigma varies often


def blur(batch, sigma):
    """A Gaussian blur of standard deviation ``sigma`` pixels, its kernel cut at 2 sigma (a third of the cost of 3)."""
    side = 2 * math.ceil(2 * sigma) + 1
    return TF.gaussian_blur(batch, [side, side], [sigma])


def grey(batch, u, v):
    """Ink and background brought together: the contrast between them down to 5% (log-uniform in v),
    on a background lifted by up to 0.7 (u), as faint pencil or a grey page gives."""
    return lift(batch * 0.05**v, 0.7 * u)


def random_geometry(batch):
    """Each image of the batch turned, zoomed, sheared and moved at random within ROTATION, ZOOM, SHEAR, SHIFT."""
    n, device = batch.shape[0], batch.device

    def uniform(low, high, *shape):
        return torch.empty(n, *shape, device=device).uniform_(low, high)

    return affine(
        batch,
        angle=uniform(-ROTATION, ROTATION).deg2rad(),
        scale=uniform(*map(math.log, ZOOM)).exp(),
        shift=uniform(-SHIFT, SHIFT, 2),
        shear=uniform(-SHEAR, SHEAR).deg2rad(),
    )


def distort(batch):
    """lenet5_reg's augmentation of a (N, 1, 28, 28) batch in [0, 1] with background 0, on the batch's
    device: ``random_geometry`` on a GEOMETRY_SHARE of the images, then one of LOOKS on a LOOK_SHARE
    of them, a draw of its own for each image. It draws from torch's global RNGs, so seeding torch
    repeats it."""
    n, device = batch.shape[0], batch.device
    moved = torch.rand(n, device=device) < GEOMETRY_SHARE
    batch = torch.where(moved.view(n, 1, 1, 1), random_geometry(batch), batch)
    look = torch.randint(len(LOOKS), (n,), device=device)
    look = look.masked_fill(torch.rand(n, device=device) >= LOOK_SHARE, -1)  # -1: the look is kept
    u, v = torch.rand(2, n, 1, 1, 1, device=device)
    out = batch.clone()
    for k, change in enumerate(LOOKS.values()):
        chosen = (look == k).nonzero().squeeze(1)  # waits for the device: a few times per chunk, not per step
        if len(chosen):
            out[chosen] = change(batch[chosen], u[chosen], v[chosen])
    return out


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

    def distorted(self):
        """This split with every image distorted by ``distort``, a new draw at each call (torch's global
        RNG): lenet5_reg's training set for one epoch. The labels and uint8 images are shared.

        The whole split is distorted at once, a chunk at a time, before its batches are served: a
        batch of 32 is too small for the distortion's many small operations to be cheap.
        """
        split = copy.copy(self)
        chunks = self.images.split(DISTORT_CHUNK)
        split.normalized = torch.cat([normalize(distort(to_unit(chunk))) for chunk in chunks])
        split.augmented = True
        return split

    def held_out(self, size):
        """(this split without its last ``size`` items, those last items), sharing its tensors; the second
        is None when ``size`` is 0. The validation split of ``--val-size``."""
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
        """One index gives one (image (1, 28, 28), label int): an int, a numpy integer or a 0-d integer tensor
        (what ``Subset(ds, np.arange(n))`` hands over); a list or tensor of indices a batch (N, 1, 28, 28), (N,)."""
        if isinstance(index, int) or getattr(index, "ndim", None) == 0:
            image, label = self[[operator.index(index)]]
            return image[0], int(label[0])
        # index_select gathers rows about 1.2x faster than indexing with a tensor, measured in bench.py's data path.
        index = torch.as_tensor(index, device=self.device)
        return self.normalized.index_select(0, index), self.labels.index_select(0, index)


class BatchSlices(Sampler):
    """Index tensors of whole batches: slices of a random permutation, or of 0..N-1 without a generator.

    With a generator it visits the same order as ``BatchSampler(RandomSampler(data, generator=g), ...)``,
    at a fraction of the cost: no Python list per batch. The order is drawn on the CPU, so it is the
    same on every device, then moved to ``device`` once per epoch: on a GPU, copying a small index
    to the device for every batch would make each step wait for the one before.
    """

    def __init__(self, size, batch_size, generator=None, device=None):
        self.size, self.batch_size, self.generator, self.device = size, batch_size, generator, device

    def __len__(self):
        return math.ceil(self.size / self.batch_size)

    def __iter__(self):
        if self.generator is None:
            order = torch.arange(self.size)
        else:
            order = torch.randperm(self.size, generator=self.generator)
        return iter(order.to(self.device).split(self.batch_size))


def batch_loader(split, batch_size, generator=None):
    """A DataLoader of whole batches sliced from an in-memory ``MNIST`` split; shuffled when given a generator."""
    # batch_size=None: each index the sampler yields already selects a batch; no per-item collation.
    sampler = BatchSlices(len(split), batch_size, generator, split.device)
    return DataLoader(split, batch_size=None, sampler=sampler)


# --------------------------------------------------------------------------- preparing the tars


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
        for i, (image, label) in enumerate(zip(images, labels)):
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
        print(f"warning: {path}: MD5 differs from the official file; using it as given", file=sys.stderr)


def download_idx(raw_dir, mirrors=None):
    """Download the four IDX files into ``raw_dir`` from ``mirrors`` (default MIRRORS), each MD5-checked.

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
                raise DatasetError(f"{raw_dir}: cannot write the download there ({e.strerror})") from None
            failures.append(f"{mirror}{name} ({getattr(e, 'reason', e)})")
        except BaseException:
            target.unlink(missing_ok=True)
            raise
    network = "" if all(f.endswith("(wrong MD5)") for f in failures) else ", or connect to the internet and run again"
    raise DatasetError(
        f"Could not download {name}; tried: {'; '.join(failures)}. "
        f"Either put train.tar and test.tar in {raw_dir.parent}, "
        f"or pass --idx-dir DIR naming a folder with the four MNIST IDX files{network}."
    )


def _writable_folder(folder):
    """Make ``folder`` (and its missing parents) if need be and check that files can be written in it.

    Returns the folders it made, deepest first, so a failure can remove them again.
    """
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        _remove_empty(made)
        raise DatasetError(f"{folder}: cannot write the tars there ({e.strerror})") from None
    return made


def _remove_empty(folders):
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty


def prepare(out="data", idx_dir=None, splits=("train", "test"), mirrors=None):
    """Write ``out/{split}.tar`` for each split from the IDX files in ``idx_dir``, or downloaded ones.

    Files in ``idx_dir`` are trusted input: an MD5 that differs from the
    official one is only a warning. Returns the paths written. A failure leaves
    nothing behind: no tar, no download, no folder that was not there before.
    """
    out = Path(out)
    if idx_dir is not None and not Path(idx_dir).is_dir():
        raise DatasetError(f"{idx_dir}: no such directory")
    made = _writable_folder(out)
    try:
        idx_dir = download_idx(out / "raw", mirrors) if idx_dir is None else Path(idx_dir)
        written = []
        for split in splits:
            paths = [_find_idx(idx_dir, stem) for stem in SPLITS[split]]
            for path in paths:
                _check_trusted(path)
            images, labels = (read_idx(p) for p in paths)
            if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(images) != len(labels):
                raise DatasetError(f"{paths[0]}: {images.shape} images do not fit {len(labels)} labels of 28x28 digits")
            write_split_tar(images, labels, out / f"{split}.tar", split)
            written.append(out / f"{split}.tar")
    except BaseException:
        _remove_empty(made)
        raise
    return written


def split_path(data_dir, split, folders=True):
    """Where a split is in ``data_dir``: ``{split}.tar`` if it is there, else (with ``folders``) the
    folder ``{split}/`` of PNGs it extracts to; None when neither is."""
    tar, folder = Path(data_dir) / f"{split}.tar", Path(data_dir) / split
    return tar if tar.is_file() else folder if folders and folder.is_dir() else None


def find_splits(data_dir="data", idx_dir=None, folders=True):
    """(train, test) paths in ``data_dir`` (see ``split_path``); a split that is missing is prepared as a tar first."""
    found = {split: split_path(data_dir, split, folders) for split in SPLITS}
    missing = [split for split, path in found.items() if path is None]
    if missing:
        source = idx_dir or "a download"
        print(
            f"{data_dir}: {' and '.join(f'{s}.tar' for s in missing)} missing; preparing from {source}", file=sys.stderr
        )
        found.update(zip(missing, prepare(data_dir, idx_dir, splits=missing)))
    return found["train"], found["test"]


def load_splits(data_dir, idx_dir, device, train_limit=None, test_limit=None):
    """The training and test sets in ``data_dir`` (see ``find_splits``), on ``device``; DatasetError if unreadable."""
    try:
        train_path, test_path = find_splits(data_dir, idx_dir)
        return MNIST(train_path, limit=train_limit).to(device), MNIST(test_path, limit=test_limit).to(device)
    except OSError as e:
        raise DatasetError(f"{e.filename}: cannot read it ({e.strerror})") from None


def safe_console():
    """Make stdout and stderr write what the console cannot encode (a Hangul path on a CP1252 console)
    as escapes instead of raising, and each line in one write, even under PYTHONUNBUFFERED (which
    writes a print's text and its newline apart): torchrun's ranks share one stdout, and their lines
    must not interleave. Each script calls it when run, never on import."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):  # a stream replaced by a notebook or a test
            stream.reconfigure(errors="backslashreplace", line_buffering=True, write_through=False)


def main(argv=()):
    parser = argparse.ArgumentParser(
        prog="dataset.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser(
        "prepare",
        help="write train.tar and test.tar in the course layout",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    prep.add_argument("--idx-dir", type=Path, help="folder with the four IDX files (.gz or not); default: download")
    prep.add_argument("--out", type=Path, default=Path("data"), help="folder to write the tars to")
    args = parser.parse_args(list(argv))
    try:
        for path in prepare(args.out, args.idx_dir):
            print(path)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    safe_console()
    sys.exit(main(sys.argv[1:]))
