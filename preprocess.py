"""Any image of a digit as MNIST would have made it: ``to_mnist``.

MNIST's digits are white on black, fitted into a 20x20 box (aspect ratio kept, anti-aliased) and
centred by their centre of mass in a 28x28 field. A photo of ink on paper is none of that, so
``to_mnist`` first finds the ink (whatever the paper, its light and its polarity), then crops, fits
and centres it the way MNIST did; predict.py's command line and its drawing page both use it.
"""

import functools
import io

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dataset import IMAGE_SIDE, normalize, to_unit

# A 50-megapixel phone photo; anything claiming more is refused before decoding.
MAX_PIXELS = 50_000_000
# Pixels decoded at most: a JPEG is decoded reduced (PIL's draft), other formats whole.
MAX_DECODED = 16_000_000
WORK_SIDE = 512  # larger images are shrunk to this before the pixel work: a digit needs no more
BOX = 20  # MNIST: the digit's longer side, inside its IMAGE_SIDE square


class ImageInputError(Exception):
    """An image that cannot be read, or holds no digit; the message says which and why."""


def open_image(data):
    """Decode image bytes to a grayscale PIL image: turned upright as the camera saw it,
    transparency composited on white (a drawing's empty canvas is white paper)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:  # checked before any pixel is decoded
                raise ImageInputError(
                    f"{image.width}x{image.height} pixels is more than {MAX_PIXELS:,}"
                )
            # decoded at 1/2, 1/4 or 1/8 of its size, still at least WORK_SIDE
            if image.format == "JPEG":
                image.draft("L", (WORK_SIDE, WORK_SIDE))
            if image.width * image.height > MAX_DECODED:
                raise ImageInputError(
                    f"{image.width}x{image.height} pixels is more than {MAX_DECODED:,} for a"
                    f" {image.format} (a JPEG may have up to {MAX_PIXELS:,}); send a smaller image"
                )
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                image = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
            return image.convert("L")
    except Image.DecompressionBombError:
        raise ImageInputError("an absurd pixel count (a decompression bomb)") from None
    except UnidentifiedImageError:
        raise ImageInputError("not an image (no format PIL reads)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageInputError(f"a damaged image ({e})") from None


@functools.lru_cache(maxsize=8)
def plane_design(h, w):
    """The least-squares design of a plane over an h x w image: columns 1, row / h, column / w
    (read-only; kept, as the page sends one size again and again)."""
    design = np.ones((h * w, 3), np.float32)
    design[:, 1] = np.repeat(np.arange(h, dtype=np.float32) / h, w)
    design[:, 2] = np.tile(np.arange(w, dtype=np.float32) / w, h)
    design.flags.writeable = False
    return design


def ink_map(gray):
    """Bright ink on a background of exactly 0, in [0, 1], from a grayscale uint8 array.

    - Polarity: a light border means dark ink on a light page, which is inverted.
    - Uneven light (a shadow, a gradient): a plane fitted to the background pixels is subtracted.
    - Noise: what stays within four standard deviations of the background is set to 0, and the
      ink is stretched to full brightness. The spread is measured below the background's median,
      where no ink is, so a digit that fills half the image does not inflate it.

    Raises ImageInputError when nothing stands out from the background.
    """
    x = gray.astype(np.float32) / 255
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    if np.median(border) > 0.5:
        x = 1 - x
    h, w = x.shape
    design = plane_design(h, w)
    flat = x.ravel()
    background = flat <= np.median(flat)  # to start with: ink covers less than half the image
    # fit, take the pixels far above the fit for ink, fit again, until that settles
    for _ in range(6):
        # least squares by the normal equations: three unknowns, so a 3x3 system
        fit = design[background]
        coef = np.linalg.solve(fit.T @ fit, fit.T @ flat[background])
        residual = flat - design @ coef
        level, below = np.percentile(residual[background], [50, 15.87])
        # the noise's standard deviation, from the paper's side alone: ink lies above
        spread = level - below
        settled = background
        background = residual < level + max(3 * spread, 0.02)
        if np.array_equal(background, settled):
            break
    residual = residual.reshape(h, w) - level
    floor = max(4 * spread, 0.02)
    if residual.max() < floor + 0.1:
        raise ImageInputError("no ink found: the image is empty or blank")
    top = np.percentile(residual[residual > floor], 99)
    return np.clip((residual - floor) / max(top - floor, 1e-6), 0, 1)


def ink_box(ink):
    """(top, bottom, left, right) of the ink, without specks (fewer than two inked neighbours)."""
    mask = ink > 0
    padded = np.pad(mask, 1)
    neighbours = sum(
        padded[1 + dy : 1 + dy + mask.shape[0], 1 + dx : 1 + dx + mask.shape[1]]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if dy or dx
    )
    rows, cols = np.nonzero(mask & (neighbours >= 2))
    if len(rows) == 0:
        raise ImageInputError("no ink found: only specks stand out from the background")
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def to_mnist(image):
    """A PIL image of a digit as MNIST would have made it: (normalized tensor (1, 1, 28, 28), uint8
    28x28 view).

    Any size and format PIL reads, colour or grayscale, either polarity, the digit anywhere:
    crop to the ink, fit the longer side into 20 pixels keeping the aspect ratio (anti-aliased),
    then place it in 28x28 with its centre of mass at the centre, and normalize as in training.
    An MNIST digit comes through nearly unchanged.
    """
    image = image.convert("L")  # a copy: thumbnail() below leaves the caller's image alone
    if max(image.size) > WORK_SIDE:
        image.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.LANCZOS)
    ink = ink_map(np.asarray(image))
    top, bottom, left, right = ink_box(ink)
    crop = Image.fromarray(np.round(ink[top:bottom, left:right] * 255).astype(np.uint8))
    scale = BOX / max(crop.size)
    size = (max(1, int(crop.width * scale + 0.5)), max(1, int(crop.height * scale + 0.5)))
    digit = np.asarray(crop.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    mass = digit.sum()
    centre_y = (digit.sum(1) * np.arange(digit.shape[0])).sum() / mass
    centre_x = (digit.sum(0) * np.arange(digit.shape[1])).sum() / mass
    field = np.zeros((IMAGE_SIDE, IMAGE_SIDE), np.float32)
    # MNIST's centre of mass is at (14, 14)
    y0, x0 = round(IMAGE_SIDE / 2 - centre_y), round(IMAGE_SIDE / 2 - centre_x)
    ys, xs = (
        slice(max(y0, 0), min(y0 + digit.shape[0], IMAGE_SIDE)),
        slice(max(x0, 0), min(x0 + digit.shape[1], IMAGE_SIDE)),
    )
    field[ys, xs] = digit[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    view = np.clip(np.round(field), 0, 255).astype(np.uint8)
    return normalize(to_unit(torch.from_numpy(view)[None])), view
