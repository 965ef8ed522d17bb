"""Every change this project makes to a batch of digits, and lenet5_reg's augmentation recipe.

The same functions serve the training augmentation (``distort``, its ranges below), the robustness
sweep's families (robustness.py) and the moved digits of learned.py. Each takes a (N, C, H, W)
float batch in [0, 1] with background 0, on any device, and a strength that is one number for the
whole batch or one per image.
"""

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF


def _per_image(value, batch):
    """A strength as a (N, 1, 1, 1) tensor: one number for every image, or one per image."""
    value = torch.as_tensor(value, dtype=batch.dtype, device=batch.device)
    return value.reshape(-1).expand(batch.shape[0]).reshape(-1, 1, 1, 1)


# ------------------------------------------------------------ shape and place


def affine(batch, angle, scale, shift, shear):
    """Each image turned by its own ``angle`` (radians), zoomed by ``scale``, sheared along x by
    ``shear`` (radians) and moved by ``shift`` (N, 2: x and y, in pixels), about its centre.

    One ``affine_grid`` + ``grid_sample`` call for the whole batch (torchvision's ``affine`` takes
    one set of parameters per call); the background (0) fills what comes in from outside.
    """
    n, _, height, width = batch.shape
    cos, sin, tan = angle.cos(), angle.sin(), shear.tan()
    zero = torch.zeros_like(cos)
    # The grid maps output to input coordinates: the inverse of x -> zoom(shear(rotate(x))) + shift.
    rows = [
        torch.stack([cos, sin - cos * tan, zero], 1),
        torch.stack([-sin, cos + sin * tan, zero], 1),
    ]
    theta = torch.stack(rows, 1) / scale.view(n, 1, 1)
    # the grid spans [-1, 1]
    moved = torch.stack([shift[:, 0] * 2 / width, shift[:, 1] * 2 / height], 1)
    theta[:, :, 2] = -(theta[:, :, :2] @ moved.unsqueeze(2)).squeeze(2)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, align_corners=False, padding_mode="zeros")


def _geometry(batch, angle=0.0, scale=1.0, shift=(0.0, 0.0), shear=0.0):
    """``affine`` with its parameters given in degrees, each one number or one per image."""
    n = batch.shape[0]

    def each(value):
        return torch.as_tensor(value, dtype=batch.dtype, device=batch.device).reshape(-1).expand(n)

    moves = (
        torch.as_tensor(shift, dtype=batch.dtype, device=batch.device).reshape(-1, 2).expand(n, 2)
    )
    return affine(batch, each(angle).deg2rad(), each(scale), moves, each(shear).deg2rad())


def shift(batch, moves):
    """Moved by ``moves`` pixels: (x, y) for every image, or (N, 2), one move each."""
    return _geometry(batch, shift=moves)


def rotate(batch, degrees):
    """Turned by ``degrees`` about the centre."""
    return _geometry(batch, angle=degrees)


def zoom(batch, scale):
    """Zoomed by ``scale`` about the centre: above 1 the digit grows, below 1 it shrinks."""
    return _geometry(batch, scale=scale)


def shear(batch, degrees):
    """Sheared along x by ``degrees``: rows slide sideways in proportion to their height."""
    return _geometry(batch, shear=degrees)


# ------------------------------------------------------------ look


def contrast(batch, factor, centre=0.0):
    """The contrast scaled by ``factor``: every pixel pulled toward ``centre`` (0, the background,
    or one value per image), keeping ``factor`` of its distance from it."""
    return (batch - centre) * _per_image(factor, batch) + centre


def lift(batch, level):
    """The background raised toward white: 0 becomes ``level`` and 1 stays 1."""
    return torch.lerp(batch, torch.ones_like(batch), _per_image(level, batch))


def grey(batch, u, v):
    """Ink and background brought together: the contrast between them down to 5% (log-uniform in v),
    on a background lifted by up to 0.7 (u), as faint pencil or a grey page gives."""
    return lift(contrast(batch, 0.05**v), 0.7 * u)


def thicker(batch, width, steps=1):
    """Strokes thickened by ``width`` pixels on each side, at most ``steps``: grey dilation with a
    3x3 square once per whole pixel, the last fraction blended in."""
    width = _per_image(width, batch)
    for step in range(steps):
        dilated = F.max_pool2d(batch, 3, stride=1, padding=1)
        batch = torch.lerp(batch, dilated, (width - step).clamp(0, 1))
    return batch


def thinner(batch, width, steps=1):
    """Strokes thinned by ``width`` pixels on each side: the dilation of the negative."""
    return -thicker(-batch, width, steps)


def blur(batch, sigma):
    """A Gaussian blur of ``sigma`` pixels (one for the batch), its kernel cut at 2 sigma."""
    side = 2 * math.ceil(2 * sigma) + 1
    return TF.gaussian_blur(batch, [side, side], [sigma])


def cover(batch, side, generator=None):
    """A square of ``side`` pixels set to the background, placed at random so that its centre lies
    on the digit's 20x20 box."""
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
    """Gaussian noise of standard deviation ``sigma``, clipped to [0, 1]."""
    grain = torch.randn(batch.shape, generator=generator, device=batch.device, dtype=batch.dtype)
    return (batch + grain * _per_image(sigma, batch)).clamp(0, 1)


def salt_and_pepper(batch, fraction, generator=None):
    """A ``fraction`` of the pixels set to 0 or 1, half each."""
    draw = torch.rand(batch.shape, generator=generator, device=batch.device, dtype=batch.dtype)
    fraction = _per_image(fraction, batch)
    batch = batch.masked_fill(draw < fraction / 2, 0.0)
    return batch.masked_fill((draw >= fraction / 2) & (draw < fraction), 1.0)


def hollow(batch, width, steps=2):
    """Hollow strokes: each stroke's outline, ``width`` pixels thick, its inside taken out (the
    image less its erosion by ``width``); a stroke no thicker than twice ``width`` stays whole."""
    return (batch - thinner(batch, width, steps)).clamp(0, 1)


def strokes(batch, width, darkness, generator=None):
    """One free stroke over each image, as a crossing-out or a stray pen line: a quadratic curve
    from a point of the digit's 20x20 box to another 8 to 24 pixels away, bent up to a third of
    its length to either side, ``width`` pixels wide (1 to 3) and ``darkness`` bright (per image
    or one for the batch); pixels keep the brighter of the stroke and the image.

    The curve is drawn as 64 points, each shared among its four nearest pixels (a pixel keeps its
    largest share: a line one pixel wide, anti-aliased), then thickened."""
    n, _, height, side = batch.shape
    device, dtype = batch.device, batch.dtype
    u = torch.rand(n, 5, generator=generator, device=device, dtype=dtype)
    start = 4 + 20 * u[:, :2]
    angle, length = 2 * math.pi * u[:, 2], 8 + 16 * u[:, 3]
    end = start + length.unsqueeze(1) * torch.stack([angle.cos(), angle.sin()], 1)
    normal = torch.stack([-angle.sin(), angle.cos()], 1)
    control = (start + end) / 2 + ((u[:, 4:] - 0.5) * 2 / 3 * length.unsqueeze(1)) * normal
    t = torch.linspace(0, 1, 64, device=device, dtype=dtype).view(1, -1, 1)
    curve = (1 - t) ** 2 * start.unsqueeze(1) + 2 * t * (1 - t) * control.unsqueeze(1)
    curve = curve + t**2 * end.unsqueeze(1) - 0.5  # (N, 64, 2), in pixel indices
    corner = curve.floor()
    line = torch.zeros(n, height * side, device=device, dtype=dtype)
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        x, y = corner[..., 0] + dx, corner[..., 1] + dy
        share = (1 - (curve[..., 0] - x).abs()) * (1 - (curve[..., 1] - y).abs())
        inside = (x >= 0) & (x < side) & (y >= 0) & (y < height)
        index = (y.clamp(0, height - 1) * side + x.clamp(0, side - 1)).long()
        line.scatter_reduce_(1, index, share * inside, "amax")
    line = thicker(line.view(n, 1, height, side), (_per_image(width, batch) - 1) / 2)
    return torch.maximum(batch, line * _per_image(darkness, batch))


# ------------------------------------------------------------ the recipe

# lenet5_reg's training augmentation: broad ranges of the ways people's digits differ from MNIST's
# own (docs/recipe.md says why these). Most images get their own rotation, zoom, shear and shift,
# and some of them one change of look from LOOKS, each with its own strength.
ROTATION = 15.0  # degrees, either way
ZOOM = (0.8, 1.15)  # scale, log-uniform
SHEAR = 10.0  # degrees, either way
SHIFT = 2.0  # pixels, either way, along each axis
GEOMETRY_SHARE = 0.75  # the other images keep their shape and place
LOOK_SHARE = 0.4  # the other images keep their look
# Each change of look, given per-image strengths u and v, uniform in [0, 1].
LOOKS = {
    # up to 1.25 pixels off each side
    "thinner": lambda batch, u, v: thinner(batch, 1.25 * u, steps=2),
    # up to 2.5 pixels on each side
    "thicker": lambda batch, u, v: thicker(batch, 2.5 * u, steps=3),
    # sigma 0.5 to 3, one per call
    "blurred": lambda batch, u, v: blur(batch, 0.5 + 2.5 * torch.rand(()).item()),
    # a square of 4 to 16 pixels
    "covered": lambda batch, u, v: cover(batch, 4 + 12 * u),
    "grey": lambda batch, u, v: grey(batch, u, v),
    "noisy": lambda batch, u, v: noise(batch, 0.6 * u),
    "speckled": lambda batch, u, v: salt_and_pepper(batch, 0.3 * u),
    # the outline of the ink, 0.5 to 1.5 pixels thick
    "hollow": lambda batch, u, v: hollow(batch, 0.5 + u),
}
# Free strokes across the digit, after the look: one on a STROKE_SHARE of the images, a second on
# half of those; each 1 to 3 pixels wide and 0.4 to 1 bright.
STROKE_SHARE = 0.3
# The parts ``--augment-without`` may leave out: the looks, and the free strokes.
PARTS = (*LOOKS, "strokes")
# Images distorted together: few enough that the blur's sigma varies often.
DISTORT_CHUNK = 1024


def random_geometry(batch):
    """Each image turned, zoomed, sheared and moved at random, within the ranges above."""
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


def distort(batch, without=()):
    """lenet5_reg's augmentation of a (N, 1, 28, 28) batch: ``random_geometry`` on a GEOMETRY_SHARE
    of the images, then one of LOOKS on a LOOK_SHARE of them, then free ``strokes`` on a
    STROKE_SHARE of them, each a draw of its own for each image. The PARTS named in ``without`` are
    left out (the ablations). It draws from torch's global RNGs, so seeding torch repeats it."""
    n, device = batch.shape[0], batch.device
    moved = torch.rand(n, device=device) < GEOMETRY_SHARE
    batch = torch.where(moved.view(n, 1, 1, 1), random_geometry(batch), batch)
    looks = [change for name, change in LOOKS.items() if name not in without]
    look = torch.randint(len(looks), (n,), device=device)
    # -1: the look is kept
    look = look.masked_fill(torch.rand(n, device=device) >= LOOK_SHARE, -1)
    u, v = torch.rand(2, n, 1, 1, 1, device=device)
    out = batch.clone()
    for k, change in enumerate(looks):
        # nonzero waits for the device: a few times per chunk, not per step
        chosen = (look == k).nonzero().squeeze(1)
        if len(chosen):
            out[chosen] = change(batch[chosen], u[chosen], v[chosen])
    if "strokes" in without:
        return out
    crossed = torch.rand(n, device=device)
    for share in (STROKE_SHARE, STROKE_SHARE / 2):
        chosen = (crossed < share).nonzero().squeeze(1)
        width, darkness = torch.rand(2, len(chosen), device=device)
        out[chosen] = strokes(out[chosen], 1 + 2 * width, 0.4 + 0.6 * darkness)
    return out
